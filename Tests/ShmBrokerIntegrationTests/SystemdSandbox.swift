import Foundation
import Glibc
import XCTest

/// A real systemd booted as PID 1 of a new PID + mount namespace, with shmbroker's unit files
/// installed, for testing the daemon as a service (recipe: shared/notes "A real systemd for tests").
///
/// The namespace gets private tmpfs mounts on /tmp, /var/tmp, /var/log/journal and
/// /etc/systemd/system, masked
/// tmpfiles units (a plain boot would empty the host's /tmp), and private copies of /etc/passwd and
/// /etc/group with the `shmbroker` user from our sysusers snippet. Everything it needs lives in a
/// state directory outside /tmp, removed at the end. Always call ``powerOff()``.
final class SystemdSandbox {
    let state: String
    /// The unit under test: `shmbroker` (the daemon) or `shmbroker-sysload` (the example owner).
    let unit: String
    var socketPath: String { "/run/\(unit)/control.sock" }
    private let unshare: Process
    private(set) var systemdPID: Int32 = 0

    var configPath: String { state + "/shmbroker.json" }
    var binaries: String { state + "/bin" }
    var ctl: String { binaries + "/shmbrokerctl" }
    var testKit: String { binaries + "/shmbroker-testkit" }

    static func requirements() throws {
        guard getuid() == 0 else { throw XCTSkip("booting systemd in a namespace needs root (CI runs as root)") }
        for tool in ["/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/systemctl"] {
            guard FileManager.default.isExecutableFile(atPath: tool) else { throw XCTSkip("needs \(tool)") }
        }
        let probe = try runToCompletion("/usr/bin/unshare", ["--fork", "--pid", "--mount", "--mount-proc", "/bin/true"], timeout: 20)
        guard probe.status == 0 else { throw XCTSkip("unshare of PID and mount namespaces is not permitted here: \(probe.stderr)") }
    }

    /// Boots systemd with the units from `systemd/` (paths pointed at this build) and a config.
    ///
    /// - Parameters:
    ///   - segments: the config's segments.
    ///   - serviceOverrides: extra `[Service]` lines for a drop-in (e.g. a short `WatchdogSec=`).
    ///   - unit: which unit files of `systemd/` to install (`NAME.service`, `NAME.socket`).
    ///   - executable: the binary its ExecStart runs, with `arguments` after `--config PATH`.
    ///   - extraConfig: more top-level keys for the config (such as `persistence`).
    init(segments: [[String: Any]], serviceOverrides: [String] = [], unit: String = "shmbroker",
         executable: String = "shmbrokerd", arguments: String = "--debug-allow-hang", extraConfig: [String: Any] = [:]) throws {
        try SystemdSandbox.requirements()
        self.unit = unit
        let state = "/var/lib/shmbroker-tests/\(getpid())-\(UUID().uuidString.prefix(8))"
        let configPath = state + "/shmbroker.json"
        self.state = state
        let fm = FileManager.default
        try fm.createDirectory(atPath: state + "/bin", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        try fm.createDirectory(atPath: state + "/units", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        _ = chmod("/var/lib/shmbroker-tests", 0o755)
        for binary in ["shmbrokerd", "shmbrokerctl", "shmbroker-testkit", "shmbroker-sysload"] {
            try fm.copyItem(atPath: Binaries.path(binary), toPath: "\(state)/bin/\(binary)")
        }
        try TestDaemon.writeConfig(at: configPath, socketPath: "/run/\(unit)/control.sock", segments: segments, extra: extraConfig)
        _ = chmod(configPath, 0o644)

        let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let units = repository.appendingPathComponent("systemd")
        let service = try String(contentsOf: units.appendingPathComponent("\(unit).service"), encoding: .utf8)
            .split(separator: "\n", omittingEmptySubsequences: false)
            .map { $0.hasPrefix("ExecStart=") ? "ExecStart=\(state)/bin/\(executable) --config \(configPath) \(arguments)" : String($0) }
            .joined(separator: "\n")
        try service.write(toFile: state + "/units/\(unit).service", atomically: true, encoding: .utf8)
        try fm.copyItem(atPath: units.appendingPathComponent("\(unit).socket").path, toPath: state + "/units/\(unit).socket")
        try fm.copyItem(atPath: units.appendingPathComponent("shmbroker.sysusers.conf").path, toPath: state + "/units/shmbroker.sysusers.conf")
        let dropIn = "[Service]\n" + serviceOverrides.joined(separator: "\n") + "\n"
        try dropIn.write(toFile: state + "/units/override.conf", atomically: true, encoding: .utf8)

        let boot = """
        #!/bin/sh
        set -e
        mount -t tmpfs tmpfs /etc/systemd/system
        mount -t tmpfs tmpfs /tmp
        mount -t tmpfs tmpfs /var/tmp
        if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
        ln -s /dev/null /etc/systemd/system/systemd-tmpfiles-setup.service
        ln -s /dev/null /etc/systemd/system/systemd-tmpfiles-clean.timer
        ln -s /dev/null /etc/systemd/system/systemd-tmpfiles-setup-dev.service
        mkdir -p \(state)/root/etc
        cp /etc/passwd /etc/group \(state)/root/etc/
        cp /etc/shadow /etc/gshadow \(state)/root/etc/ 2>/dev/null || true
        systemd-sysusers --root=\(state)/root - < \(state)/units/shmbroker.sysusers.conf
        chmod 0644 \(state)/root/etc/passwd \(state)/root/etc/group
        mount --bind \(state)/root/etc/passwd /etc/passwd
        mount --bind \(state)/root/etc/group /etc/group
        cp \(state)/units/\(unit).service \(state)/units/\(unit).socket /etc/systemd/system/
        mkdir -p /etc/systemd/system/\(unit).service.d
        cp \(state)/units/override.conf /etc/systemd/system/\(unit).service.d/override.conf
        exec env container=unshare /lib/systemd/systemd --system --log-target=journal --log-level=info
        """
        try boot.write(toFile: state + "/boot.sh", atomically: true, encoding: .utf8)
        _ = chmod(state + "/boot.sh", 0o755)

        unshare = Process()
        unshare.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        unshare.arguments = ["--fork", "--pid", "--mount", "--mount-proc", "--propagation", "private", state + "/boot.sh"]
        unshare.standardInput = FileHandle.nullDevice
        _ = fm.createFile(atPath: state + "/systemd.log", contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: state + "/systemd.log"))
        unshare.standardOutput = log
        unshare.standardError = log
        try unshare.run()
        do {
            try waitForBoot()
        } catch {
            powerOff()
            throw error
        }
    }

    private func waitForBoot() throws {
        let deadline = Date().addingTimeInterval(60)
        // unshare's child is first boot.sh, then (same pid, after exec) systemd.
        while Date() < deadline {
            if let child = childPID(of: unshare.processIdentifier),
               (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(child)/exe"))?.hasSuffix("/systemd") == true {
                systemdPID = child
                break
            }
            guard unshare.isRunning else { throw TestFailure("namespace exited during boot: \(bootLog)") }
            usleep(20_000)
        }
        guard systemdPID != 0 else { throw TestFailure("systemd did not start: \(bootLog)") }
        while Date() < deadline {
            let state = try inside(["/usr/bin/systemctl", "is-system-running"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if state == "running" || state == "degraded" { return }
            usleep(50_000)
        }
        throw TestFailure("systemd never reached running: \(bootLog)")
    }

    private func childPID(of parent: Int32) -> Int32? {
        guard let children = try? String(contentsOfFile: "/proc/\(parent)/task/\(parent)/children", encoding: .utf8) else { return nil }
        return children.split(separator: " ").first.flatMap { Int32($0) }
    }

    var bootLog: String { (try? String(contentsOfFile: state + "/systemd.log", encoding: .utf8)) ?? "" }

    /// Runs a command inside the namespace (its own /run, its systemd).
    @discardableResult
    func inside(_ command: [String], asNobody: Bool = false, stdin: Data? = nil, timeout: Double = 120) throws -> ProcessResult {
        var arguments = ["-t", "\(systemdPID)", "-m", "-p"]
        if asNobody { arguments += ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] }
        return try runToCompletion("/usr/bin/nsenter", arguments + command, stdin: stdin, timeout: timeout)
    }

    /// Starts a long-running command inside the namespace.
    func spawnInside(_ command: [String]) throws -> ChildProcess {
        try ChildProcess("/usr/bin/nsenter", ["-t", "\(systemdPID)", "-m", "-p"] + command)
    }

    @discardableResult
    func systemctl(_ arguments: String...) throws -> ProcessResult {
        try inside(["/usr/bin/systemctl"] + arguments)
    }

    func property(_ name: String) throws -> String {
        try systemctl("show", "-p", name, "--value", "\(unit).service").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func mainPID() throws -> Int32 { Int32(try property("MainPID")) ?? 0 }

    func ctlCommand(_ arguments: [String]) -> [String] { [ctl] + arguments + ["--socket", socketPath] }

    /// Waits until the service is active with a main PID other than `previous`.
    func waitForNewMainPID(other previous: Int32, timeout: Double = 30) throws -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let pid = try mainPID()
            let active = try property("ActiveState") == "active"
            if pid != 0 && pid != previous && active { return pid }
            usleep(50_000)
        }
        throw TestFailure("no new main PID after \(previous): \(try journal())")
    }

    func journal() throws -> String {
        try inside(["/usr/bin/journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout
    }

    /// The host's pid of a process that has `namespacePID` inside the sandbox.
    func hostPID(_ namespacePID: Int32) throws -> Int32 {
        for entry in try FileManager.default.contentsOfDirectory(atPath: "/proc") {
            guard let pid = Int32(entry),
                  let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("NSpid:") }) else { continue }
            let ids = line.split(whereSeparator: { $0 == "\t" || $0 == " " }).dropFirst().compactMap { Int32($0) }
            if ids.count >= 2, ids.last == namespacePID, contains(pid) { return pid }
        }
        throw TestFailure("no host pid for namespace pid \(namespacePID)")
    }

    /// Whether host process `pid` lives in this sandbox's PID namespace.
    func contains(_ pid: Int32) -> Bool {
        let mine = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/pid")
        let theirs = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(systemdPID)/ns/pid")
        return mine != nil && mine == theirs
    }

    /// Powers the namespace's systemd off (SIGKILL if that fails) and removes the state directory.
    func powerOff() {
        if systemdPID != 0 {
            _ = try? inside(["/usr/bin/systemctl", "poweroff", "--no-block"], timeout: 20)
        }
        if !unshare.waitForExit(seconds: 20) {
            if systemdPID != 0 { kill(systemdPID, SIGKILL) }
            kill(unshare.processIdentifier, SIGKILL)
            _ = unshare.waitForExit(seconds: 10)
        }
        try? FileManager.default.removeItem(atPath: state)
    }
}
