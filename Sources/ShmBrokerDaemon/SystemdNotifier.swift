import CSystemd

/// The daemon's side of the systemd notification protocol (`sd_notify`).
///
/// Outside systemd (no `NOTIFY_SOCKET`) every call does nothing, so the daemon runs the same way
/// in a terminal, under a test's notify listener, and under PID 1.
public struct SystemdNotifier: Sendable {
    public init() {}

    /// Sends raw `KEY=VALUE` lines; returns whether a notify socket received them.
    @discardableResult
    public func notify(_ lines: String) -> Bool {
        sd_notify(0, lines) > 0
    }

    public func ready(status: String) { notify("READY=1\nSTATUS=\(Self.oneLine(status))") }
    public func status(_ text: String) { notify("STATUS=\(Self.oneLine(text))") }
    public func reloading(status: String) { notify("RELOADING=1\nSTATUS=\(Self.oneLine(status))") }
    public func stopping(status: String) { notify("STOPPING=1\nSTATUS=\(Self.oneLine(status))") }
    public func watchdogAlive() { notify("WATCHDOG=1") }

    /// The watchdog interval requested by the service manager for this process, if any.
    public func watchdogIntervalMicroseconds() -> UInt64? {
        var usec: UInt64 = 0
        return sd_watchdog_enabled(0, &usec) > 0 && usec > 0 ? usec : nil
    }

    /// STATUS= values are single lines; a newline would start a new assignment.
    static func oneLine(_ text: String) -> String {
        String(text.map { $0.isNewline ? " " : $0 })
    }
}
