import CSystemd
import Glibc
import ShmBrokerPlatform
import SystemPackage

/// The daemon's side of the systemd notification protocol (`sd_notify`) and of the fd store.
///
/// Outside systemd (no `NOTIFY_SOCKET`) every call does nothing, so the daemon runs the same way
/// in a terminal, under a test's notify listener, and under PID 1.
public struct SystemdNotifier: Sendable {
    /// Whether descriptors go to the fd store: only when systemd itself started this process as a
    /// service, since whatever listens on `NOTIFY_SOCKET` receives them, writable segment memory
    /// included, and outside systemd that may be anyone's socket.
    public let storesDescriptors: Bool
    /// Whether this notifier says nothing at all: for an owner embedded in an application that
    /// speaks to systemd itself (READY, STATUS, the watchdog), so that the two never contradict
    /// each other and the watchdog watches the application's own loop.
    public let isSilent: Bool

    /// - Parameters:
    ///   - storesDescriptors: nil (the default) decides by ``startedBySystemd``.
    ///   - silent: send nothing, store nothing, and report no watchdog.
    public init(storesDescriptors: Bool? = nil, silent: Bool = false) {
        self.isSilent = silent
        self.storesDescriptors = !silent && (storesDescriptors ?? Self.startedBySystemd)
    }

    /// Whether systemd started this process as a service: it is PID 1's child (the service
    /// manager spawns it directly), systemd gave it an `INVOCATION_ID`, and a `NOTIFY_SOCKET`.
    public static var startedBySystemd: Bool {
        CurrentProcess.parentProcessID == 1 && CurrentProcess.hasEnvironment("INVOCATION_ID")
            && CurrentProcess.hasEnvironment("NOTIFY_SOCKET")
    }

    /// Sends raw `KEY=VALUE` lines; returns whether a notify socket received them.
    @discardableResult
    public func notify(_ lines: String) -> Bool {
        !isSilent && sd_notify(0, lines) > 0
    }

    public func ready(status: String) { notify("READY=1\nSTATUS=\(Self.oneLine(status))") }
    public func status(_ text: String) { notify("STATUS=\(Self.oneLine(text))") }
    public func reloading(status: String) { notify("RELOADING=1\nSTATUS=\(Self.oneLine(status))") }
    public func stopping(status: String) { notify("STOPPING=1\nSTATUS=\(Self.oneLine(status))") }
    public func watchdogAlive() { notify("WATCHDOG=1") }

    /// The watchdog interval requested by the service manager for this process, if any.
    public func watchdogIntervalMicroseconds() -> UInt64? {
        guard !isSilent else { return nil }
        var usec: UInt64 = 0
        return sd_watchdog_enabled(0, &usec) > 0 && usec > 0 ? usec : nil
    }

    /// Hands a descriptor to systemd's fd store under `name`, so that it survives a restart.
    /// - Returns: whether systemd received it (false outside systemd, or when
    ///   ``storesDescriptors`` is false).
    @discardableResult
    public func store(_ descriptor: FileDescriptor, name: String) -> Bool {
        guard storesDescriptors else { return false }
        var raw = descriptor.rawValue
        return sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=\(name)", &raw, 1) > 0
    }

    /// Drops every stored descriptor named `name` from the fd store.
    @discardableResult
    public func removeStored(name: String) -> Bool {
        guard storesDescriptors else { return false }
        return notify("FDSTOREREMOVE=1\nFDNAME=\(name)")
    }

    /// STATUS= values are single lines; a newline would start a new assignment.
    static func oneLine(_ text: String) -> String {
        String(text.map { $0.isNewline ? " " : $0 })
    }
}

/// Descriptors passed by systemd at start-up (`LISTEN_FDS`): the socket unit's listening socket and
/// segment memfds that an earlier run of the daemon put in the fd store.
public struct InheritedDescriptors {
    /// The prefix of the fd-store name of each segment memfd: `segment-NAME`.
    public static let segmentNamePrefix = "segment-"
    /// The prefix of the fd-store name of each segment's wait board: `board-NAME`.
    public static let boardNamePrefix = "board-"

    /// A listening `SOCK_SEQPACKET` socket from the socket unit.
    public var listener: FileDescriptor?
    /// Stored segment memfds by segment name.
    public var segments: [String: FileDescriptor] = [:]
    /// Stored wait boards by segment name.
    public var boards: [String: FileDescriptor] = [:]
    /// Other descriptors, with their names: logged and closed by the daemon.
    public var unrecognised: [(descriptor: FileDescriptor, name: String)] = []

    public init() {}

    /// Takes the descriptors systemd passed (and unsets `LISTEN_FDS` so children do not see them).
    public static func takeFromSystemd() -> InheritedDescriptors {
        var result = InheritedDescriptors()
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let count = sd_listen_fds_with_names(1, &names)
        defer {
            if let names {
                for index in 0..<Int(max(count, 0)) { free(names[index]) }
                free(names)
            }
        }
        guard count > 0 else { return result }
        for index in 0..<Int(count) {
            let raw = SD_LISTEN_FDS_START + Int32(index)
            let descriptor = FileDescriptor(rawValue: raw)
            let name = names?[index].map { String(cString: $0) } ?? ""
            try? descriptor.setCloseOnExec()
            if sd_is_socket(raw, AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 1) > 0, result.listener == nil {
                try? descriptor.setNonBlocking()
                result.listener = descriptor
            } else if name.hasPrefix(segmentNamePrefix), (try? descriptor.isRegularFile()) == true {
                let segment = String(name.dropFirst(segmentNamePrefix.count))
                if let duplicate = result.segments[segment] { result.unrecognised.append((duplicate, name)) }
                result.segments[segment] = descriptor
            } else if name.hasPrefix(boardNamePrefix), (try? descriptor.isRegularFile()) == true {
                let segment = String(name.dropFirst(boardNamePrefix.count))
                if let duplicate = result.boards[segment] { result.unrecognised.append((duplicate, name)) }
                result.boards[segment] = descriptor
            } else {
                result.unrecognised.append((descriptor, name))
            }
        }
        return result
    }
}
