import Foundation
import Glibc
import ShmBrokerClient
import XCTest

/// The third campaign's file-system findings (issue 17, items 1–3, 8, 9, 14): what a user who can
/// write a directory the daemon uses, or a full disk, could do to it.
final class HostileFilesTests: XCTestCase {
    func scratchDirectory(_ kind: String) throws -> String {
        let path = "/var/tmp/shmbroker-\(kind)-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        return path
    }

    func persistentDaemon(directory: String, interval: Double = 30) throws -> TestDaemon {
        var persistent = segment("state", size: "64KiB")
        persistent["persist"] = true
        return try TestDaemon(segments: [persistent],
                              extraConfig: ["persistence": ["directory": directory, "intervalSeconds": interval]])
    }

    func permissions(_ path: String) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int) ?? -1
    }

    /// Item 1: a user who may write the textfile's directory plants links at the temporary name
    /// the daemon used and at the textfile itself, aimed at a root-only file. The root daemon
    /// must overwrite neither, nor change its mode; the world-readable textfile shows only what
    /// everyone may see.
    func testTheMetricsTextfileFollowsNoPlantedLinkAndShowsOnlyPublicSegments() async throws {
        try requireRoot()
        let base = try scratchDirectory("textfile")
        defer { try? FileManager.default.removeItem(atPath: base) }
        let victim = base + "-victim"
        try Data("root only\n".utf8).write(to: URL(fileURLWithPath: victim))
        chmod(victim, 0o600)
        defer { unlink(victim) }
        // The directory belongs to nobody, who plants the links (as the campaign did).
        XCTAssertEqual(chown(base, 65534, 65534), 0)
        let textfile = base + "/shmbroker.prom"
        for link in [textfile + ".tmp", textfile] {
            let planted = try runToCompletion("/bin/ln", ["-s", victim, link], asNobody: true)
            XCTAssertEqual(planted.status, 0, planted.stderr)
        }
        let daemon = try TestDaemon(segments: [segment("open", size: 64, publishers: ["*"]), segment("secret", size: 64, readers: [0])],
                                    extraConfig: ["metrics": ["textfile": textfile, "intervalSeconds": 1]])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("open", bytes: [1])
        try await client.publish("secret", bytes: [2])
        client.close()
        let deadline = Date().addingTimeInterval(20)
        var written = ""
        while Date() < deadline {
            if let entry = try? FileManager.default.attributesOfItem(atPath: textfile), entry[.type] as? FileAttributeType == .typeRegular {
                written = (try? String(contentsOfFile: textfile, encoding: .utf8)) ?? ""
                if written.contains(#"shmbroker_segment_publishes_total{segment="open"} 1"#) { break }
            }
            usleep(100_000)
        }
        XCTAssertEqual(try String(contentsOfFile: victim, encoding: .utf8), "root only\n", "the link's target was not written")
        XCTAssertEqual(permissions(victim), 0o600, "the link's target keeps its mode")
        XCTAssertTrue(written.contains(#"shmbroker_segment_publishes_total{segment="open"} 1"#), written)
        XCTAssertEqual(permissions(textfile), 0o644)
        XCTAssertFalse(written.contains("secret"), "a world-readable textfile lists only public segments: \(written)")
        XCTAssertFalse(written.contains("shmbroker_event_loop_iterations_total"), "nor daemon-wide activity: \(written)")
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: base).filter { $0.hasSuffix(".tmp") && $0 != "shmbroker.prom.tmp" }
        XCTAssertEqual(leftovers, [], "no temporary file left behind")
    }

    /// Item 1: a textfile in a directory every user may write (without the sticky bit) is not
    /// written, with a message that says why; a mode without the others-read bit shows everything.
    func testAnUnsafeTextfileDirectoryIsRefusedAndAPrivateModeShowsEverything() async throws {
        let open = try scratchDirectory("textfile-open")
        let closed = try scratchDirectory("textfile-closed")
        defer {
            try? FileManager.default.removeItem(atPath: open)
            try? FileManager.default.removeItem(atPath: closed)
        }
        chmod(open, 0o777)
        let refused = try TestDaemon(segments: [segment("a", size: 64)],
                                     extraConfig: ["metrics": ["textfile": open + "/m.prom", "intervalSeconds": 1]])
        XCTAssertTrue(refused.child.waitForStderr("cannot write the metrics textfile"), refused.child.stderrText)
        let log = refused.stop().stderr
        XCTAssertTrue(log.contains("is writable by every user"), log)
        XCTAssertFalse(FileManager.default.fileExists(atPath: open + "/m.prom"))

        let daemon = try TestDaemon(segments: [segment("a", size: 64), segment("secret", size: 64, readers: [0])],
                                    extraConfig: ["metrics": ["textfile": closed + "/m.prom", "intervalSeconds": 1, "textfileMode": "0640"]])
        defer { daemon.stop() }
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: closed + "/m.prom") && Date() < deadline { usleep(100_000) }
        let text = try String(contentsOfFile: closed + "/m.prom", encoding: .utf8)
        XCTAssertTrue(text.contains(#"segment="secret""#) && text.contains("shmbroker_event_loop_iterations_total"), text)
        XCTAssertEqual(permissions(closed + "/m.prom"), 0o640)
    }

    /// Item 2: a save that failed on a full disk is retried; once space returns, the version is
    /// saved (by the next round, and in any case on stop), and a stop/start serves it.
    func testAVersionThatCouldNotBeSavedOnAFullDiskIsSavedOnceSpaceReturns() async throws {
        try requireRoot()
        let directory = try scratchDirectory("fulldisk")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        guard try runToCompletion("/bin/mount", ["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", directory]).status == 0 else {
            throw XCTSkip("cannot mount a tmpfs here")
        }
        defer { _ = try? runToCompletion("/bin/umount", [directory]) }
        let file = directory + "/state.segment"
        func savedVersion() -> UInt64? {
            guard let data = FileManager.default.contents(atPath: file), data.count >= 88 else { return nil }
            return data.subdata(in: 80..<88).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        }
        func waitForSavedVersion(_ version: UInt64) -> Bool {
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                if savedVersion() == version { return true }
                usleep(100_000)
            }
            return false
        }
        let daemon = try persistentDaemon(directory: directory, interval: 1)
        let client = try await daemon.connect()
        try await client.publish("state", bytes: Array("version one".utf8))
        XCTAssertTrue(waitForSavedVersion(1), "the first version is saved")

        // Fill the disk, then publish a version that cannot be saved.
        let filler = directory + "/filler"
        let handle = try XCTUnwrap(fopen(filler, "w"))
        let block = [UInt8](repeating: 0x55, count: 4096)
        while fwrite(block, 1, block.count, handle) == block.count {}
        fclose(handle)
        let second = [UInt8](repeating: 2, count: 20_000)
        try await client.publish("state", bytes: second)
        XCTAssertTrue(daemon.child.waitForStderr("saving a persistent segment failed"), daemon.child.stderrText)
        XCTAssertEqual(savedVersion(), 1)

        // Space returns: the next round saves version 2.
        unlink(filler)
        XCTAssertTrue(waitForSavedVersion(2), "a failed save is retried: \(daemon.child.stderrText)")
        XCTAssertTrue(daemon.child.waitForStderr("persistent segment saved again"), daemon.child.stderrText)

        // And a version published on a full disk right before a stop is saved by the stop.
        let refill = try XCTUnwrap(fopen(filler, "w"))
        while fwrite(block, 1, block.count, refill) == block.count {}
        fclose(refill)
        let third = [UInt8](repeating: 3, count: 20_000)
        try await client.publish("state", bytes: third)
        let failuresLogged = Date().addingTimeInterval(20)
        while daemon.child.stderrText.components(separatedBy: "saving a persistent segment failed").count < 3 && Date() < failuresLogged {
            usleep(100_000)
        }
        XCTAssertEqual(savedVersion(), 2, "version 3 could not be saved yet")
        unlink(filler)
        client.close()
        try daemon.restart()
        defer { daemon.stop() }
        let reader = try await daemon.connect()
        let opened = try await reader.open("state")
        let restored = try XCTUnwrap(try opened.read())
        XCTAssertEqual(restored.version, 3, daemon.child.stderrText)
        XCTAssertEqual(restored.bytes, third)
        reader.close()
    }

    /// Item 3: a FIFO where a saved segment belongs must not hang the start: it is refused as not
    /// a regular file, moved aside, and the daemon starts and answers.
    func testAFIFOInPlaceOfASavedSegmentDoesNotHangTheStart() async throws {
        let directory = try scratchDirectory("fifo")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        chmod(directory, 0o700)
        XCTAssertEqual(mkfifo(directory + "/state.segment", 0o600), 0)
        let daemon = try persistentDaemon(directory: directory)
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let opened = try await client.open("state")
        XCTAssertNil(try opened.read(), "nothing is served from a FIFO")
        XCTAssertTrue(daemon.child.stderrText.contains("is a FIFO, not a regular file"), daemon.child.stderrText)
        var info = stat()
        XCTAssertEqual(lstat(directory + "/state.segment.rejected", &info), 0, "moved aside")
        XCTAssertEqual(info.st_mode & S_IFMT, S_IFIFO)
        client.close()
    }

    /// Item 8: a persistence directory another user may write, or that belongs to another user,
    /// is refused at start with the reason; a file planted there is never served.
    func testAnUntrustedPersistenceDirectoryIsRefused() async throws {
        try requireRoot()
        let directory = try scratchDirectory("untrusted")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        for (setUp, expected) in [({ chmod(directory, 0o777) }, "is writable by every user"),
                                  ({ chmod(directory, 0o770) }, "is writable by its group"),
                                  ({ chmod(directory, 0o755) | chown(directory, 65534, 65534) }, "is owned by uid 65534")] as [(() -> Int32, String)] {
            _ = setUp()
            let result = try runToCompletion(Binaries.daemon, ["--config", try configFile(directory: directory), "--log-level", "info"], timeout: 30)
            XCTAssertNotEqual(result.status, 0, "\(expected): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains(expected), "\(expected): \(result.stderr)")
        }
    }

    /// Item 8: a saved file owned by another user (planted before the directory was locked down)
    /// is not served; item 9: nor a saved version that cannot be continued.
    func testAPlantedFileOrAVersionThatCannotBeContinuedIsRejected() async throws {
        try requireRoot()
        let directory = try scratchDirectory("planted")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        chmod(directory, 0o700)
        let daemon = try persistentDaemon(directory: directory)
        let client = try await daemon.connect()
        try await client.publish("state", bytes: Array("saved".utf8))
        client.close()
        daemon.stop()
        let file = directory + "/state.segment"
        let good = try Data(contentsOf: URL(fileURLWithPath: file))

        XCTAssertEqual(chown(file, 65534, 65534), 0)
        let planted = try persistentDaemon(directory: directory)
        let reader = try await planted.connect()
        let openedPlanted = try await reader.open("state")
        XCTAssertNil(try openedPlanted.read(), "a file of another user is not served")
        reader.close()
        let log = planted.stop().stderr
        XCTAssertTrue(log.contains("is owned by uid 65534"), log)
        XCTAssertTrue(FileManager.default.fileExists(atPath: file + ".rejected"))

        // Version 2^64 - 1 with valid CRCs: the next publish would be version 0.
        var wrapped = good
        wrapped.replaceSubrange(80..<88, with: withUnsafeBytes(of: UInt64.max.littleEndian) { Data($0) })
        let headerCRC = wrapped.prefix(112).withUnsafeBytes { crc64(UnsafeRawBufferPointer($0)) }
        wrapped.replaceSubrange(112..<120, with: withUnsafeBytes(of: headerCRC.littleEndian) { Data($0) })
        try wrapped.write(to: URL(fileURLWithPath: file))
        let restarted = try persistentDaemon(directory: directory)
        let again = try await restarted.connect()
        let openedWrapped = try await again.open("state")
        XCTAssertNil(try openedWrapped.read(), "a version that cannot be continued is not served")
        let next = try await again.publish("state", bytes: [1])
        XCTAssertEqual(next.version, 1)
        again.close()
        let second = restarted.stop().stderr
        XCTAssertTrue(second.contains("cannot be continued"), second)
        // Item 14: the second rejection keeps the first copy.
        XCTAssertTrue(FileManager.default.fileExists(atPath: file + ".rejected"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: file + ".rejected.2"))
    }

    /// Item 14: a saved file replaced by an older copy (version 7 back to 3) is not served as if
    /// current: the rollback is logged, and its content is served as version 8, so that versions
    /// never go backwards for readers.
    func testARolledBackFileIsLoggedAndServedAfterTheNewestVersion() async throws {
        let directory = try scratchDirectory("rollback")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        chmod(directory, 0o700)
        let file = directory + "/state.segment"
        let daemon = try persistentDaemon(directory: directory)
        let client = try await daemon.connect()
        for index in 1...3 { try await client.publish("state", bytes: Array("version \(index)".utf8)) }
        client.close()
        try daemon.restart()  // saved: version 3
        let old = try Data(contentsOf: URL(fileURLWithPath: file))
        let again = try await daemon.connect()
        for index in 4...7 { try await again.publish("state", bytes: Array("version \(index)".utf8)) }
        again.close()
        daemon.stop()  // saved: version 7
        try old.write(to: URL(fileURLWithPath: file))

        let restarted = try persistentDaemon(directory: directory)
        let reader = try await restarted.connect()
        let handle = try await reader.open("state")
        let served = try XCTUnwrap(try handle.read())
        XCTAssertEqual(served.bytes, Array("version 3".utf8), "the restored content is the file's")
        XCTAssertEqual(served.version, 8, "as a version after the newest saved one")
        let next = try await reader.publish("state", bytes: [9])
        XCTAssertEqual(next.version, 9)
        reader.close()
        let log = restarted.stop().stderr
        XCTAssertTrue(log.contains("rollback") && log.contains("newestSaved=7"), log)
    }

    /// Item 16: a persistence directory that cannot be created is named with its problem (it was
    /// "NSCocoaErrorDomain error 512" and "/proc/self/st: The file doesn't exist").
    func testAnUnusablePersistenceDirectoryIsNamedWithItsProblem() throws {
        for (directory, problem) in [("/proc/self/st/state", "cannot create the directory /proc/self/st:"),
                                     ("/dev/null/state", "/dev/null is a character device")] {
            let result = try runToCompletion(Binaries.daemon, ["--config", try configFile(directory: directory), "--log-level", "info"], timeout: 30)
            XCTAssertNotEqual(result.status, 0)
            XCTAssertTrue(result.stderr.contains(problem), "\(directory): \(result.stderr)")
            XCTAssertFalse(result.stderr.contains("NSCocoaErrorDomain"), result.stderr)
        }
    }

    /// Item 14: a saved file the owner cannot read is left where it is and never saved over (it
    /// was moved aside, and the next save replaced it). The daemon runs as `nobody`, for whom a
    /// file of mode 000 is unreadable.
    func testAnUnreadableSavedFileIsLeftInPlaceAndNotSavedOver() async throws {
        try requireRoot()
        let directory = try scratchDirectory("unreadable")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = directory + "/state.segment"
        let original = Data("saved by an earlier run".utf8)
        try original.write(to: URL(fileURLWithPath: file))
        XCTAssertEqual(chmod(file, 0), 0)
        XCTAssertEqual(chown(file, 65534, 65534), 0)
        XCTAssertEqual(chmod(directory, 0o700), 0)
        XCTAssertEqual(chown(directory, 65534, 65534), 0)
        let socketPath = "/tmp/shmbroker-unreadable-\(getpid())-\(UUID().uuidString.prefix(6)).sock"
        var persistent = segment("state", size: 64, publishers: ["*"])
        persistent["persist"] = true
        let config = try configFile(directory: directory)
        try TestDaemon.writeConfig(at: config, socketPath: socketPath, segments: [persistent],
                                   extra: ["persistence": ["directory": directory, "intervalSeconds": 1]])
        chmod(config, 0o644)
        let daemon = try ChildProcess(Binaries.daemon, ["--config", config, "--log-level", "info"], asNobody: true)
        defer {
            daemon.signal(SIGTERM)
            _ = daemon.finish(timeout: 30)
            unlink(socketPath)
        }
        let deadline = Date().addingTimeInterval(30)
        while !FileManager.default.fileExists(atPath: socketPath) && Date() < deadline && daemon.process.isRunning { usleep(20_000) }
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "unreadable-test")
        let handle = try await client.open("state")
        XCTAssertNil(try handle.read(), "nothing is served from a file that could not be read")
        try await client.publish("state", bytes: Array("new".utf8))
        client.close()
        sleep(2)  // two persistence rounds
        daemon.signal(SIGTERM)
        let log = daemon.finish(timeout: 30).stderr
        XCTAssertTrue(log.contains("leaving the file in place"), log)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: file)), original, "the file was neither moved nor saved over")
        XCTAssertFalse(FileManager.default.fileExists(atPath: file + ".rejected"))
    }

    func configFile(directory: String) throws -> String {
        let path = "/tmp/shmbroker-config-\(getpid())-\(UUID().uuidString.prefix(8)).json"
        addTeardownBlock {
            unlink(path)
            unlink(path + ".sock")
        }
        var persistent = segment("state", size: 64)
        persistent["persist"] = true
        try TestDaemon.writeConfig(at: path, socketPath: path + ".sock", segments: [persistent],
                                   extra: ["persistence": ["directory": directory]])
        return path
    }
}

/// CRC-64/XZ, bit by bit: the test's own reference, independent of the code under test.
func crc64(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    var crc = UInt64.max
    for byte in bytes {
        crc ^= UInt64(byte)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xC96C_5795_D787_0F42 : crc >> 1 }
    }
    return ~crc
}
