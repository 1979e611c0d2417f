import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// Where `swift build` put the executables: beside the test bundle.
enum Binaries {
    static let directory: URL = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var url = URL(fileURLWithPath: exe)
        // .../debug/shmbrokerPackageTests.xctest (a file on Linux) -> .../debug
        while url.pathComponents.count > 1 && !FileManager.default.fileExists(atPath: url.appendingPathComponent("shmbrokerd").path) {
            url.deleteLastPathComponent()
        }
        return url
    }()

    static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
    static var daemon: String { path("shmbrokerd") }
    static var ctl: String { path("shmbrokerctl") }
    static var testKit: String { path("shmbroker-testkit") }
}

extension Process {
    /// Waits up to `seconds` for Foundation to report the exit; false if it did not.
    ///
    /// Never `waitUntilExit()` without a bound: Foundation learns of an exit when the child's end
    /// of a socket pair closes, and a daemon the child left behind (tmux's server) keeps it open.
    func waitForExit(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while isRunning && Date() < deadline { usleep(10_000) }
        return !isRunning
    }
}

/// A finished child process.
struct ProcessResult {
    var status: Int32
    var stdout: String
    var stderr: String

    /// The last stdout line parsed as a JSON object (the testkit's result).
    func json(file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let last = stdout.split(separator: "\n").last.map(String.init) ?? ""
        guard let object = try JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any] else {
            XCTFail("no JSON result in stdout: \(stdout) stderr: \(stderr)", file: file, line: line)
            return [:]
        }
        return object
    }
}

/// A child process with captured output.
final class ChildProcess: @unchecked Sendable {
    let process = Process()
    private let stdoutFile: URL
    private let stderrFile: URL

    init(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, asNobody: Bool = false,
         stdin: Data? = nil) throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("shmbroker-child-\(UUID().uuidString)")
        stdoutFile = scratch.appendingPathExtension("out")
        stderrFile = scratch.appendingPathExtension("err")
        _ = FileManager.default.createFile(atPath: stdoutFile.path, contents: nil)
        _ = FileManager.default.createFile(atPath: stderrFile.path, contents: nil)
        if asNobody {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", executable] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments
        }
        if let environment { process.environment = environment }
        process.standardOutput = try FileHandle(forWritingTo: stdoutFile)
        process.standardError = try FileHandle(forWritingTo: stderrFile)
        if let stdin {
            let pipe = Pipe()
            process.standardInput = pipe
            try process.run()
            pipe.fileHandleForWriting.write(stdin)
            try pipe.fileHandleForWriting.close()
        } else {
            process.standardInput = FileHandle.nullDevice
            try process.run()
        }
    }

    var pid: Int32 { process.processIdentifier }

    /// Where the child's standard output goes, for reading it while the child runs.
    var stdoutPath: String { stdoutFile.path }

    func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    var stderrText: String { (try? String(contentsOf: stderrFile, encoding: .utf8)) ?? "" }

    /// Complete lines written to stdout so far.
    var stdoutLineCount: Int {
        ((try? String(contentsOf: stdoutFile, encoding: .utf8)) ?? "").filter { $0 == "\n" }.count
    }

    /// Waits up to `seconds` for Foundation to report the exit; false if it did not.
    func waitForExit(seconds: Double) -> Bool { process.waitForExit(seconds: seconds) }

    /// Waits for exit (killing the process after `timeout` seconds) and collects its output.
    /// A process whose exit is never reported gets status -1 and says so in `stderr`.
    func finish(timeout: Double = 120) -> ProcessResult {
        if !waitForExit(seconds: timeout) {
            kill(process.processIdentifier, SIGKILL)
        }
        let reported = waitForExit(seconds: 10)
        let status: Int32
        if !reported {
            status = -1
        } else {
            status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
        }
        let result = ProcessResult(
            status: status,
            stdout: (try? String(contentsOf: stdoutFile, encoding: .utf8)) ?? "",
            stderr: stderrText + (reported ? "" : "\n[test harness: the exit of pid \(pid) was not reported 10 s after SIGKILL; "
                + "a process it started may hold Foundation's exit descriptor]"))
        try? FileManager.default.removeItem(at: stdoutFile)
        try? FileManager.default.removeItem(at: stderrFile)
        return result
    }

    /// Polls until stderr contains `text` (used to learn that a child reached a given point).
    func waitForStderr(_ text: String, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if stderrText.contains(text) { return true }
            if !process.isRunning { return stderrText.contains(text) }
            usleep(10_000)
        }
        return false
    }
}

/// Runs a command that leaves a daemon behind (tmux starts its server): the command runs with
/// every descriptor above stderr closed, so the daemon does not inherit the one through which
/// Foundation learns that its child exited (or the exit would not be reported while it lives).
@discardableResult
func runDetaching(_ executable: String, _ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
    let closeAndExec = #"for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done; exec "$0" "$@""#
    return try runToCompletion("/bin/bash", ["-c", closeAndExec, executable] + arguments, timeout: timeout)
}

/// Runs a command to completion.
@discardableResult
func runToCompletion(_ executable: String, _ arguments: [String], asNobody: Bool = false, stdin: Data? = nil, timeout: Double = 120) throws -> ProcessResult {
    try ChildProcess(executable, arguments, asNobody: asNobody, stdin: stdin).finish(timeout: timeout)
}

/// A datagram socket standing in for systemd's notify socket: collects `sd_notify` messages.
final class NotifyListener {
    let path: String
    let fd: Int32
    /// Every datagram received so far, in order.
    private(set) var received: [String] = []

    init(directory: String) throws {
        path = directory + "/notify.sock"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8) + [0])
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw Errno(rawValue: errno) }
    }

    deinit { close(fd) }

    /// Waits for the next datagram; nil on timeout.
    func next(timeout: Double) -> String? {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, Int32(timeout * 1000)) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        guard n > 0 else { return nil }
        let message = String(decoding: buffer[..<n], as: UTF8.self)
        received.append(message)
        return message
    }

    /// Waits for a datagram containing `line` (as one of its lines); returns that datagram.
    func waitFor(_ line: String, timeout: Double = 30) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            guard let message = next(timeout: deadline.timeIntervalSinceNow) else { return nil }
            if message.split(separator: "\n").contains(where: { $0 == line }) { return message }
        }
        return nil
    }
}

/// A real `shmbrokerd` process on a private config and socket, stopped with SIGTERM at the end.
final class TestDaemon {
    let directory: String
    let socketPath: String
    let configPath: String
    let notify: NotifyListener?
    private(set) var child: ChildProcess
    private let environment: [String: String]
    private let launcher: [String]

    /// Writes a config with `segments` and starts the daemon.
    ///
    /// - Parameters:
    ///   - segments: JSON objects for the config's `segments` array.
    ///   - limits: the config's `limits` object.
    ///   - withNotifySocket: give the daemon a NOTIFY_SOCKET and wait for READY=1 there
    ///     (otherwise wait until the control socket accepts connections).
    init(segments: [[String: Any]], limits: [String: Any] = [:], withNotifySocket: Bool = false,
         waitUntilReady: Bool = true, extraEnvironment: [String: String] = [:], launcher: [String] = [],
         extraConfig: [String: Any] = [:]) throws {
        let base = "/tmp/shmbroker-test-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        directory = base
        socketPath = base + "/control.sock"
        configPath = base + "/shmbroker.json"
        try TestDaemon.writeConfig(at: configPath, socketPath: socketPath, segments: segments, limits: limits, extra: extraConfig)
        notify = withNotifySocket ? try NotifyListener(directory: base) : nil
        var environment = ProcessInfo.processInfo.environment
        environment.removeValue(forKey: "NOTIFY_SOCKET")
        environment.removeValue(forKey: "WATCHDOG_USEC")
        if let notify { environment["NOTIFY_SOCKET"] = notify.path }
        environment.merge(extraEnvironment) { $1 }
        self.environment = environment
        self.launcher = launcher
        child = try TestDaemon.launch(launcher, configPath: configPath, environment: environment)
        if waitUntilReady {
            if let notify {
                guard notify.waitFor("READY=1") != nil else { throw TestFailure("daemon never sent READY=1: \(child.stderrText)") }
            } else {
                try waitUntilAccepting()
            }
        }
    }

    /// Starts the daemon, through `launcher` (such as `prlimit … --`) when one is given.
    static func launch(_ launcher: [String], configPath: String, environment: [String: String]) throws -> ChildProcess {
        let arguments = ["--config", configPath, "--log-level", "debug"]
        guard let tool = launcher.first else { return try ChildProcess(Binaries.daemon, arguments, environment: environment) }
        return try ChildProcess(tool, Array(launcher.dropFirst()) + [Binaries.daemon] + arguments, environment: environment)
    }

    static func writeConfig(at path: String, socketPath: String, segments: [[String: Any]], limits: [String: Any] = [:],
                            extra: [String: Any] = [:]) throws {
        var config: [String: Any] = ["socket": ["path": socketPath, "mode": "0666"], "segments": segments]
        if !limits.isEmpty { config["limits"] = limits }
        config.merge(extra) { $1 }
        let data = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        try data.write(to: URL(fileURLWithPath: path))
    }

    func rewriteConfig(segments: [[String: Any]], limits: [String: Any] = [:]) throws {
        try TestDaemon.writeConfig(at: configPath, socketPath: socketPath, segments: segments, limits: limits)
    }

    func waitUntilAccepting(timeout: Double = 30) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let fd = try? SeqpacketSocket.connect(path: socketPath) {
                fd.closeQuietly()
                return
            }
            guard child.process.isRunning else { throw TestFailure("daemon exited: \(child.stderrText)") }
            usleep(20_000)
        }
        throw TestFailure("daemon did not accept connections within \(timeout)s: \(child.stderrText)")
    }

    var pid: Int32 { child.pid }

    /// Stops the daemon with SIGTERM (or `signal`) and starts a new one on the same config and socket.
    func restart(with signal: Int32 = SIGTERM) throws {
        child.signal(signal)
        _ = child.finish(timeout: 30)
        child = try TestDaemon.launch(launcher, configPath: configPath, environment: environment)
        try waitUntilAccepting()
    }

    func connect() async throws -> ShmBrokerClient {
        try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "integration-test")
    }

    /// Sends SIGTERM and waits for the exit.
    @discardableResult
    func stop() -> ProcessResult {
        child.signal(SIGTERM)
        let result = child.finish(timeout: 30)
        try? FileManager.default.removeItem(atPath: directory)
        return result
    }

    deinit {
        if child.process.isRunning {
            child.signal(SIGKILL)
            _ = child.waitForExit(seconds: 10)
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Skips a test that needs root (to run clients as another uid, or to boot systemd).
func requireRoot() throws {
    guard getuid() == 0 else { throw XCTSkip("needs root to run clients as another uid (CI runs as root)") }
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { throw XCTSkip("needs /usr/bin/setpriv (util-linux)") }
}

/// A segment entry for a test config.
func segment(_ name: String, size: Any, slots: Int? = nil, readers: [Any] = ["*"], publishers: [Any]? = nil) -> [String: Any] {
    var entry: [String: Any] = ["name": name, "size": size, "readers": ["users": readers]]
    if let slots { entry["slots"] = slots }
    if let publishers { entry["publishers"] = ["users": publishers] }
    return entry
}

/// A control connection that speaks raw frames, for feeding the daemon malformed input.
final class RawConnection {
    let fd: FileDescriptor
    private var nextID: UInt32 = 1

    init(socketPath: String) throws {
        fd = try SeqpacketSocket.connect(path: socketPath)
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { fd.closeQuietly() }

    func send(_ bytes: [UInt8], descriptors: [FileDescriptor] = []) throws {
        _ = try bytes.withUnsafeBytes { try SeqpacketSocket.send(fd, $0, descriptors: descriptors) }
    }

    /// Receives one frame; nil if the daemon closed the connection.
    func receive() throws -> (header: FrameHeader, message: ServerMessage, descriptors: [FileDescriptor])? {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 70_000, alignment: 8)
        defer { buffer.deallocate() }
        guard let received = try SeqpacketSocket.receive(fd, into: buffer) else { throw TestFailure("receive timed out") }
        if received.byteCount == 0 { return nil }
        let frame = UnsafeRawBufferPointer(rebasing: buffer[..<received.byteCount])
        let header = try FrameHeader.parse(frame)
        return (header, try ServerMessage.decode(type: header.type, body: Frame.body(of: frame)), received.descriptors)
    }

    /// Sends a request and returns the reply (events arriving first are skipped).
    func request(_ request: Request, descriptors: [FileDescriptor] = []) throws -> ServerMessage {
        let id = nextID
        nextID += 1
        try send(request.encode(requestID: id), descriptors: descriptors)
        return try reply(to: id)
    }

    func reply(to id: UInt32) throws -> ServerMessage {
        while true {
            guard let (header, message, descriptors) = try receive() else { throw TestFailure("daemon closed the connection") }
            descriptors.forEach { $0.closeQuietly() }
            if message.isEvent { continue }
            guard header.requestID == id else { throw TestFailure("reply to \(header.requestID), expected \(id)") }
            return message
        }
    }

    func hello() throws {
        guard case .helloOK = try request(.hello(protocolVersion: ControlProtocol.version, clientName: "raw")) else {
            throw TestFailure("handshake failed")
        }
    }
}

/// The error code of an ERROR reply, or nil for any other message.
func errorCode(_ message: ServerMessage) -> ErrorCode? {
    if case .error(let error) = message { return error.code }
    return nil
}
