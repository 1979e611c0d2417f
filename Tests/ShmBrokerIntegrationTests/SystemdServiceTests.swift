import Foundation
import Glibc
import XCTest

/// shmbrokerd as a real systemd service: Type=notify start, socket activation, reload, restart,
/// crash and watchdog recovery with no data lost, and a clean stop. Each test boots its own
/// systemd in a PID namespace and powers it off at the end, pass or fail.
final class SystemdServiceTests: XCTestCase {
    static var segments: [[String: Any]] { [segment("state", size: "4KiB"), segment("bulk", size: "1MiB", slots: 2)] }

    func withSandbox(serviceOverrides: [String] = [], _ body: (SystemdSandbox) throws -> Void) throws {
        let sandbox = try SystemdSandbox(segments: Self.segments, serviceOverrides: serviceOverrides)
        defer { sandbox.powerOff() }
        do {
            try body(sandbox)
        } catch {
            XCTFail("journal:\n\((try? sandbox.journal()) ?? "")")
            throw error
        }
    }

    func publish(_ sandbox: SystemdSandbox, _ segment: String, _ text: String) throws -> Int {
        let result = try sandbox.inside(sandbox.ctlCommand(["publish", segment, "-", "--json"]), stdin: Data(text.utf8))
        XCTAssertEqual(result.status, 0, result.stderr)
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        return json?["version"] as? Int ?? -1
    }

    func read(_ sandbox: SystemdSandbox, _ segment: String) throws -> ProcessResult {
        try sandbox.inside(sandbox.ctlCommand(["read", segment, "--verbose"]))
    }

    func testStartWaitsForReadyShowsStatusAndServesReadersThroughTheSocketUnit() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket").status, 0)
            // Type=notify: `systemctl start` returns once READY=1 arrived, i.e. every segment exists.
            let start = try sandbox.systemctl("start", "shmbroker.service")
            XCTAssertEqual(start.status, 0, start.stderr)
            XCTAssertEqual(try sandbox.property("ActiveState"), "active")
            XCTAssertEqual(try sandbox.property("SubState"), "running")
            XCTAssertEqual(try sandbox.property("StatusText").hasPrefix("serving 2 segments"), true)
            let status = try sandbox.systemctl("status", "shmbroker.service", "--no-pager")
            XCTAssertTrue(status.stdout.contains("Status: \"serving 2 segments"), status.stdout)
            XCTAssertTrue(status.stdout.contains("active (running)"), status.stdout)

            XCTAssertEqual(try publish(sandbox, "state", "through systemd"), 1)
            let reader = try sandbox.inside(sandbox.ctlCommand(["read", "state"]), asNobody: true)
            XCTAssertEqual(reader.status, 0, reader.stderr)
            XCTAssertEqual(reader.stdout, "through systemd")
            // A publish ring works inside the unit's sandbox too (eventfd check, shared mapping).
            let ring = try sandbox.inside([sandbox.testKit, "ring-producer", "--socket", sandbox.socketPath,
                                           "--segment", "state", "--count", "200"])
            XCTAssertEqual(ring.status, 0, ring.stderr)
            XCTAssertTrue(ring.stdout.contains("\"lastVersion\":201"), ring.stdout)
            let journal = try sandbox.journal()
            XCTAssertTrue(journal.contains("using the listening socket passed by systemd"), journal)
            // The daemon runs as its own user, so segment memory belongs to it, not to readers.
            let user = try sandbox.inside(["/bin/ps", "-o", "user=", "-p", "\(try sandbox.mainPID())"]).stdout
            XCTAssertEqual(user.trimmingCharacters(in: .whitespacesAndNewlines), "shmbroker")
        }
    }

    func testSocketActivationStartsTheDaemonAndQueuesClientsDuringARestart() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket").status, 0)
            XCTAssertEqual(try sandbox.property("ActiveState"), "inactive")
            // The first client's connect starts the service; it is answered once the daemon is ready.
            let status = try sandbox.inside(sandbox.ctlCommand(["status", "--json"]))
            XCTAssertEqual(status.status, 0, status.stderr)
            XCTAssertEqual(try sandbox.property("ActiveState"), "active")
            let first = try sandbox.mainPID()
            XCTAssertEqual(try publish(sandbox, "state", "before"), 1)

            // Clients connecting while the service restarts are queued by PID 1, not refused.
            XCTAssertEqual(try sandbox.systemctl("restart", "--no-block", "shmbroker.service").status, 0)
            let clients = try (0..<5).map { _ in try sandbox.spawnInside(sandbox.ctlCommand(["read", "state"])) }
            for client in clients {
                let result = client.finish(timeout: 60)
                XCTAssertEqual(result.status, 0, result.stderr)
                XCTAssertEqual(result.stdout, "before")
            }
            XCTAssertNotEqual(try sandbox.waitForNewMainPID(other: first), first)
        }
    }

    func testReloadAppliesAConfigChange() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            XCTAssertEqual(try publish(sandbox, "state", "kept"), 1)
            let pid = try sandbox.mainPID()
            try TestDaemon.writeConfig(at: sandbox.configPath, socketPath: sandbox.socketPath,
                                       segments: Self.segments + [segment("added", size: 64)])
            let reload = try sandbox.systemctl("reload", "shmbroker.service")
            XCTAssertEqual(reload.status, 0, reload.stderr)
            XCTAssertEqual(try sandbox.mainPID(), pid, "a reload is not a restart")
            XCTAssertEqual(try publish(sandbox, "added", "new segment"), 1)
            XCTAssertEqual(try read(sandbox, "state").stdout, "kept")
            XCTAssertTrue(try sandbox.journal().contains("segment added"))

            // Removing a segment also drops it from the fd store: after a restart nothing of it
            // comes back (the new process would log "no longer configured" for a leftover).
            try TestDaemon.writeConfig(at: sandbox.configPath, socketPath: sandbox.socketPath,
                                       segments: [segment("state", size: "4KiB"), segment("added", size: 64)])
            XCTAssertEqual(try sandbox.systemctl("reload", "shmbroker.service").status, 0)
            XCTAssertTrue(try sandbox.journal().contains("segment removed segment=bulk"))
            XCTAssertEqual(try sandbox.systemctl("restart", "shmbroker.service").status, 0)
            let afterRestart = try sandbox.journal()
            XCTAssertFalse(afterRestart.contains("no longer configured"), afterRestart)
            XCTAssertEqual(try read(sandbox, "added").stdout, "new segment", "kept segments survive the restart")
        }
    }

    /// A stored segment whose content no longer matches its CRC is never served: the restarted
    /// daemon logs it and starts that segment empty.
    func testACorruptStoredSegmentIsRecreatedEmptyAfterRestart() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            XCTAssertEqual(try publish(sandbox, "state", "precious"), 1)
            XCTAssertEqual(try publish(sandbox, "bulk", "other"), 1)
            // Root scribbles over the content through the daemon's own descriptor.
            let pid = try sandbox.mainPID()
            let scribble = try sandbox.inside(["/bin/sh", "-c", """
                for fd in /proc/\(pid)/fd/*; do
                  case "$(readlink "$fd")" in *memfd:shmbroker:state*)
                    printf 'XXXX' | dd of="$fd" bs=1 seek=$((256 + 64 + (1 % 3) * 4160)) conv=notrunc status=none; exit 0;;
                  esac
                done; exit 1
                """])
            XCTAssertEqual(scribble.status, 0, scribble.stderr)
            XCTAssertEqual(try sandbox.systemctl("restart", "shmbroker.service").status, 0)
            let journal = try sandbox.journal()
            XCTAssertTrue(journal.contains("stored segment failed its checks; recreated empty"), journal)
            XCTAssertEqual(try read(sandbox, "state").status, 3, "the corrupt version is not served")
            XCTAssertEqual(try read(sandbox, "bulk").stdout, "other", "other segments are restored")
            XCTAssertEqual(try publish(sandbox, "state", "fresh"), 1)
        }
    }

    /// An upgrade from a daemon whose segments had no block checksum tables (issue 20): the
    /// restarted daemon finds such a segment in the fd store, re-creates it with tables and carries
    /// its latest version over under the same number, so readers lose nothing.
    func testASegmentFromAWriterWithoutChecksumTablesIsCarriedOverAfterRestart() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            XCTAssertEqual(try publish(sandbox, "state", "older"), 1)
            XCTAssertEqual(try publish(sandbox, "state", "kept across the upgrade"), 2)
            // Root turns the stored segment into what an older writer left: the header's
            // blockChecksums flag (bit 3 of the flags word at 0x1C) and block size (0x30) cleared.
            let pid = try sandbox.mainPID()
            let downgrade = try sandbox.inside(["/bin/sh", "-c", """
                for fd in /proc/\(pid)/fd/*; do
                  case "$(readlink "$fd")" in *memfd:shmbroker:state*)
                    printf '\\002\\000\\000\\000' | dd of="$fd" bs=1 seek=28 conv=notrunc status=none
                    printf '\\000\\000\\000\\000' | dd of="$fd" bs=1 seek=48 conv=notrunc status=none; exit 0;;
                  esac
                done; exit 1
                """])
            XCTAssertEqual(downgrade.status, 0, downgrade.stderr)
            XCTAssertEqual(try sandbox.systemctl("restart", "shmbroker.service").status, 0)
            let journal = try sandbox.journal()
            XCTAssertTrue(journal.contains("stored segment resized per the config") && journal.contains("no block checksums"), journal)
            let read = try read(sandbox, "state")
            XCTAssertEqual(read.stdout, "kept across the upgrade")
            XCTAssertTrue(read.stderr.contains("version 2"), read.stderr)
            XCTAssertEqual(try publish(sandbox, "state", "after"), 3, "versions carry on from the carried-over one")
        }
    }

    /// Data survives `systemctl restart`, fifty `kill -9`s and a watchdog kill, with a producer,
    /// a mapped reader and a subscriber running throughout.
    func testRestartCrashesAndWatchdogKillLoseNoData() throws {
        // Fifty restarts in well under a minute: above the unit's StartLimitBurst=, raised here.
        try withSandbox(serviceOverrides: ["WatchdogSec=2s", "[Unit]", "StartLimitBurst=200"]) { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            let bulk = [UInt8]((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            let bulkFile = sandbox.state + "/bulk.bin"
            try Data(bulk).write(to: URL(fileURLWithPath: bulkFile))
            let bulkPublish = try sandbox.inside(sandbox.ctlCommand(["publish", "bulk", bulkFile]))
            XCTAssertEqual(bulkPublish.status, 0, bulkPublish.stderr)

            let stopFile = sandbox.state + "/stop"
            let followerStopFile = sandbox.state + "/stop-follower"
            let producer = try sandbox.spawnInside([sandbox.testKit, "producer", "--socket", sandbox.socketPath,
                                                    "--segment", "state", "--seconds", "300", "--stop-file", stopFile])
            XCTAssertTrue(producer.waitForStderr("producing"), producer.stderrText)
            let follower = try sandbox.spawnInside([sandbox.testKit, "follower", "--socket", sandbox.socketPath,
                                                    "--segment", "state", "--seconds", "300", "--stop-file", followerStopFile])
            XCTAssertTrue(follower.waitForStderr("following"), follower.stderrText)
            usleep(300_000)

            func versionOf(_ segment: String) throws -> Int {
                let result = try read(sandbox, segment)
                XCTAssertEqual(result.status, 0, result.stderr)
                let words = result.stderr.split(separator: " ")
                return words.firstIndex(of: "version").flatMap { Int(words[$0 + 1].trimmingCharacters(in: .punctuationCharacters)) } ?? -1
            }

            var pid = try sandbox.mainPID()
            var version = try versionOf("state")
            XCTAssertGreaterThan(version, 0)

            // 1. systemctl restart
            XCTAssertEqual(try sandbox.systemctl("restart", "shmbroker.service").status, 0)
            pid = try sandbox.waitForNewMainPID(other: pid)
            XCTAssertGreaterThanOrEqual(try versionOf("state"), version, "restart kept the version counter")
            version = try versionOf("state")

            // 2. fifty kill -9s of the main process (Restart=on-failure)
            for round in 0..<50 {
                XCTAssertEqual(kill(try sandbox.hostPID(pid), SIGKILL), 0)
                pid = try sandbox.waitForNewMainPID(other: pid)
                let now = try versionOf("state")
                XCTAssertGreaterThanOrEqual(now, version, "round \(round): version went back")
                version = now
            }

            // 3. the event loop hangs: WATCHDOG=1 stops, systemd kills and restarts the daemon.
            XCTAssertEqual(kill(try sandbox.hostPID(pid), SIGUSR2), 0)
            pid = try sandbox.waitForNewMainPID(other: pid, timeout: 60)
            XCTAssertTrue(try sandbox.journal().contains("hanging the event loop"))
            let systemdLog = try sandbox.inside(["/usr/bin/journalctl", "--no-pager", "-o", "cat"]).stdout
            XCTAssertTrue(systemdLog.contains("Watchdog timeout"), "systemd's own account of the kill: \(systemdLog.suffix(3000))")
            XCTAssertFalse(systemdLog.contains("swift-backtrace"), "the Swift backtracer is off under MemoryDenyWriteExecute=: \(systemdLog.suffix(2500))")
            XCTAssertGreaterThanOrEqual(try versionOf("state"), version)

            // Large content survived every restart byte for byte.
            let out = sandbox.state + "/bulk.out"
            XCTAssertEqual(try sandbox.inside(sandbox.ctlCommand(["read", "bulk", "-o", out])).status, 0)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), Data(bulk))
            XCTAssertTrue(try sandbox.journal().contains("segment restored from the fd store"))

            usleep(500_000)
            // Stop the producer first, then tell the follower which version to expect last.
            _ = FileManager.default.createFile(atPath: stopFile, contents: nil)
            let produced = try producer.finish(timeout: 30).json()
            let highest = produced["highestVersion"] as? Int ?? 0
            try Data("\(highest)\n".utf8).write(to: URL(fileURLWithPath: followerStopFile), options: .atomic)
            let followed = try follower.finish(timeout: 30).json()
            XCTAssertEqual(produced["resets"] as? Int, 0, "the version counter never restarted: \(produced)")
            XCTAssertGreaterThan(produced["published"] as? Int ?? 0, 100, "\(produced)")
            XCTAssertEqual(followed["corrupt"] as? Int, 0, "\(followed)")
            XCTAssertEqual(followed["regressions"] as? Int, 0, "\(followed)")
            XCTAssertEqual(followed["lastVersion"] as? Int, highest, "the original mapping saw the final version: \(followed)")
            XCTAssertGreaterThan(followed["firstVersion"] as? Int ?? Int.max, 0)
            XCTAssertEqual(followed["lastEventVersion"] as? Int, highest, "the subscription followed through every restart: \(followed)")
        }
    }

    func testStopLeavesNothingBehind() throws {
        try withSandbox { sandbox in
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            XCTAssertEqual(try publish(sandbox, "state", "x"), 1)
            XCTAssertEqual(try sandbox.systemctl("stop", "shmbroker.service", "shmbroker.socket").status, 0)
            XCTAssertEqual(try sandbox.property("ActiveState"), "inactive")
            XCTAssertEqual(try sandbox.property("MainPID"), "0")
            XCTAssertEqual(try sandbox.property("Result"), "success", "SIGTERM gave a clean exit 0")
            let leftovers = try sandbox.inside(["/usr/bin/pgrep", "-u", "shmbroker"])
            XCTAssertEqual(leftovers.stdout, "", "no process of the daemon's user remains")
            XCTAssertNotEqual(try sandbox.inside(["/usr/bin/test", "-e", sandbox.socketPath]).status, 0, "socket file removed")
            // `systemctl stop` flushes the fd store: a fresh start begins empty.
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
            XCTAssertEqual(try read(sandbox, "state").status, 3, "never published after a stop and start")
        }
    }

    /// The main PID as seen from the host (systemd reports it in its own PID namespace).
    /// (`NSpid:` in the host's /proc lists a process's pid in each namespace, outermost first.)
}
