import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerProtocol
import XCTest

/// Segments with "persist": true keep content and version across a stop and a start (and a
/// reboot: see SystemdServiceTests): saved atomically on stop and at an interval, restored on
/// start with their CRCs checked; a corrupt, truncated or foreign file is logged and not served;
/// a full disk keeps the previous file.
final class PersistenceTests: XCTestCase {
    func persistentDaemon(directory: String, interval: Double = 30, extraSegments: [[String: Any]] = []) throws -> TestDaemon {
        var persistent = segment("state", size: "64KiB")
        persistent["persist"] = true
        return try TestDaemon(segments: [persistent, segment("volatile", size: 64)] + extraSegments,
                              extraConfig: ["persistence": ["directory": directory, "intervalSeconds": interval]])
    }

    func scratchDirectory() throws -> String {
        let path = "/var/tmp/shmbroker-persist-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    func testContentAndVersionSurviveAStopAndAStart() async throws {
        let directory = try scratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try persistentDaemon(directory: directory)
        defer { daemon.stop() }
        let client = try await daemon.connect()
        for index in 1...3 { try await client.publish("state", bytes: Array("state \(index)".utf8)) }
        try await client.publish("volatile", bytes: [1])
        client.close()

        try daemon.restart()  // SIGTERM: a stop (saved), then a new process (no fd store here)
        let after = try await daemon.connect()
        let state = try await after.open("state")
        let restored = try XCTUnwrap(try state.read())
        XCTAssertEqual(restored.version, 3)
        XCTAssertEqual(restored.bytes, Array("state 3".utf8))
        let volatile = try await after.open("volatile")
        XCTAssertNil(try volatile.read(), "a segment without persist starts empty")
        let next = try await after.publish("state", bytes: [4])
        XCTAssertEqual(next.version, 4, "versions carry on")
        XCTAssertTrue(daemon.child.stderrText.contains("segment restored from disk"), daemon.child.stderrText)
        let files = try FileManager.default.contentsOfDirectory(atPath: directory)
        XCTAssertEqual(files.sorted(), [".state.highest", "state.segment"], "the file and its high-water mark, no temporary left behind")
        after.close()
    }

    func testTheIntervalSaveSurvivesAKill9() async throws {
        let directory = try scratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try persistentDaemon(directory: directory, interval: 1)
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("state", bytes: Array("before the kill".utf8))
        client.close()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: directory + "/state.segment") && Date() < deadline { usleep(50_000) }
        try daemon.restart(with: SIGKILL)
        let after = try await daemon.connect()
        let handle = try await after.open("state")
        XCTAssertEqual(try handle.read()?.bytes, Array("before the kill".utf8))
        after.close()
    }

    func testACorruptTruncatedOrForeignFileIsLoggedAndNotServed() async throws {
        let directory = try scratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = directory + "/state.segment"
        let daemon = try persistentDaemon(directory: directory)
        let client = try await daemon.connect()
        try await client.publish("state", bytes: Array("good content".utf8))
        client.close()
        daemon.stop()
        let good = try Data(contentsOf: URL(fileURLWithPath: file))

        var flipped = good
        flipped[flipped.count - 1] ^= 0x01
        let cases: [(String, Data, String)] = [
            ("corrupt", flipped, "fails its CRC-64"),
            ("truncated", good.prefix(good.count - 3), "is truncated"),
            ("foreign", Data(repeating: 0x42, count: 300), "not a saved shmbroker segment"),
        ]
        for (name, contents, expected) in cases {
            try contents.write(to: URL(fileURLWithPath: file))
            let restarted = try persistentDaemon(directory: directory)
            let reader = try await restarted.connect()
            let handle = try await reader.open("state")
            XCTAssertNil(try handle.read(), "\(name): not served")
            reader.close()
            let log = restarted.stop().stderr
            XCTAssertTrue(log.contains("saved segment rejected") && log.contains(expected), "\(name): \(log)")
            XCTAssertTrue(FileManager.default.fileExists(atPath: file + ".rejected"), "\(name): moved aside for inspection")
            try? FileManager.default.removeItem(atPath: file + ".rejected")
        }
    }

    func testAFullDiskKeepsThePreviousFile() async throws {
        guard getuid() == 0 else { throw XCTSkip("mounting a small tmpfs needs root") }
        let directory = try scratchDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        guard try runToCompletion("/bin/mount", ["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", directory]).status == 0 else {
            throw XCTSkip("cannot mount a tmpfs here")
        }
        defer { _ = try? runToCompletion("/bin/umount", [directory]) }
        let daemon = try persistentDaemon(directory: directory)
        let client = try await daemon.connect()
        try await client.publish("state", bytes: Array("small enough".utf8))
        client.close()
        try daemon.restart()  // saved: 128 + 12 bytes
        let again = try await daemon.connect()
        try await again.publish("state", bytes: [UInt8](repeating: 7, count: 60_000))  // cannot fit 16 KiB
        again.close()
        let log = daemon.stop().stderr
        XCTAssertTrue(log.contains("saving a persistent segment failed") && log.contains("previous file is kept"), log)
        let restarted = try persistentDaemon(directory: directory)
        defer { restarted.stop() }
        let reader = try await restarted.connect()
        let handle = try await reader.open("state")
        let kept = try XCTUnwrap(try handle.read())
        XCTAssertEqual(kept.bytes, Array("small enough".utf8))
        XCTAssertEqual(kept.version, 1)
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: directory).contains { $0.hasSuffix(".tmp") })
        reader.close()
    }
}

/// Persistence under a real systemd: `systemctl stop` empties the fd store, so only the saved
/// file can bring a segment back; a reboot is simulated by powering the namespace off and booting
/// a new one on the same StateDirectory=.
final class PersistenceUnderSystemdTests: XCTestCase {
    func testContentSurvivesStopStartAndAReboot() throws {
        try SystemdSandbox.requirements()
        let stateDirectory = "shmbroker-test-\(getpid())-\(UUID().uuidString.prefix(6))"
        defer { try? FileManager.default.removeItem(atPath: "/var/lib/" + stateDirectory) }
        var persistent = segment("state", size: "4KiB")
        persistent["persist"] = true
        let overrides = ["StateDirectory=", "StateDirectory=\(stateDirectory)"]
        func boot() throws -> SystemdSandbox {
            let sandbox = try SystemdSandbox(segments: [persistent], serviceOverrides: overrides)
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket").status, 0)
            let start = try sandbox.systemctl("start", "shmbroker.service")
            XCTAssertEqual(start.status, 0, start.stderr)
            return sandbox
        }
        func publish(_ sandbox: SystemdSandbox, _ text: String) throws {
            let result = try sandbox.inside(sandbox.ctlCommand(["publish", "state", "-"]), stdin: Data(text.utf8))
            XCTAssertEqual(result.status, 0, result.stderr)
        }
        func read(_ sandbox: SystemdSandbox) throws -> ProcessResult {
            try sandbox.inside(sandbox.ctlCommand(["read", "state", "--verbose"]), asNobody: true)
        }

        let first = try boot()
        do {
            for index in 1...3 { try publish(first, "version \(index)") }
            XCTAssertEqual(try first.systemctl("stop", "shmbroker.service").status, 0)
            let restart = try first.systemctl("start", "shmbroker.service")
            let journalAfterRestart = try first.journal()
            XCTAssertEqual(restart.status, 0, "\(restart.stderr)\n\(journalAfterRestart)")
            let afterStop = try read(first)
            XCTAssertEqual(afterStop.stdout, "version 3", afterStop.stderr)
            XCTAssertTrue(afterStop.stderr.contains("version 3"), afterStop.stderr)
            let journal = try first.journal()
            XCTAssertTrue(journal.contains("segment restored from disk"), journal)
            try publish(first, "before the reboot")
        } catch {
            XCTFail("journal:\n\((try? first.journal()) ?? "")")
            first.powerOff()
            throw error
        }
        first.powerOff()  // stops the service: the last version is saved

        let second = try boot()
        defer { second.powerOff() }
        let afterReboot = try read(second)
        XCTAssertEqual(afterReboot.stdout, "before the reboot", "\(afterReboot.stderr)\n\((try? second.journal()) ?? "")")
        XCTAssertTrue(afterReboot.stderr.contains("version 4"), afterReboot.stderr)
    }
}
