import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerProtocol
import Synchronization
import XCTest

/// sd_notify ordering against a real NOTIFY_SOCKET listener, SIGTERM, and SIGHUP reloads.
final class LifecycleTests: XCTestCase {
    func testReadyOnlyAfterEverySegmentExistsAndStoppingOnSigterm() throws {
        let names = (0..<300).map { "seg-\($0)" }
        let daemon = try TestDaemon(segments: names.map { segment($0, size: "64KiB") }, withNotifySocket: true, waitUntilReady: false)
        let notify = try XCTUnwrap(daemon.notify)
        let ready = try XCTUnwrap(notify.waitFor("READY=1", timeout: 60), "no READY=1: \(daemon.child.stderrText)")
        // At the moment READY=1 arrives, every segment's memfd already exists in the daemon...
        let links = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(daemon.pid)/fd").compactMap {
            try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(daemon.pid)/fd/\($0)")
        }
        let memfds = Set(links.filter { $0.hasPrefix("/memfd:shmbroker:") }.map { $0.dropFirst("/memfd:shmbroker:".count).split(separator: " ").first.map(String.init) ?? "" })
        XCTAssertEqual(memfds, Set(names))
        // ...and the control socket accepts connections.
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        XCTAssertTrue(ready.contains("STATUS=serving 300 segments"), ready)
        // Not started by systemd (its parent is this test): no segment descriptor goes to
        // whatever listens on NOTIFY_SOCKET (issue 17, item 18).
        XCTAssertFalse(notify.received.contains { $0.contains("FDSTORE") }, "\(notify.received.prefix(3))")

        daemon.child.signal(SIGTERM)
        let stopping = notify.waitFor("STOPPING=1", timeout: 30)
        XCTAssertNotNil(stopping)
        let exit = daemon.child.finish(timeout: 30)
        XCTAssertEqual(exit.status, 0, exit.stderr)
        XCTAssertTrue(exit.stderr.contains("<6>stopped cleanly"), "journald priority prefixes on stderr: \(exit.stderr)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: daemon.socketPath), "the socket file is removed on exit")
    }

    func testWatchdogPingsComeFromTheLiveEventLoop() throws {
        let daemon = try TestDaemon(segments: [segment("w", size: 8)], withNotifySocket: true,
                                    extraEnvironment: ["WATCHDOG_USEC": "400000"])
        defer { daemon.stop() }
        let notify = try XCTUnwrap(daemon.notify)
        for _ in 0..<3 {
            XCTAssertNotNil(notify.waitFor("WATCHDOG=1", timeout: 10), "a WATCHDOG=1 within the interval")
        }
        // Frozen, the loop sends nothing: the pings are proof of life, not a timer thread.
        daemon.child.signal(SIGSTOP)
        while notify.next(timeout: 0.05) != nil {}
        XCTAssertNil(notify.waitFor("WATCHDOG=1", timeout: 1.0))
        daemon.child.signal(SIGCONT)
        XCTAssertNotNil(notify.waitFor("WATCHDOG=1", timeout: 10))
    }

    func testStatusLineFollowsClientsAndPublishes() async throws {
        let daemon = try TestDaemon(segments: [segment("s", size: 8)], withNotifySocket: true)
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("s", bytes: [1])
        try await client.publish("s", bytes: [2])
        let update = try XCTUnwrap(daemon.notify).waitFor("STATUS=serving 1 segment to 1 client; 2 publishes", timeout: 15)
        XCTAssertNotNil(update, "STATUS= refreshed after clients and publishes changed")
    }

    func testWithoutWatchdogUsecNoPingsAreSent() throws {
        let daemon = try TestDaemon(segments: [segment("w", size: 8)], withNotifySocket: true)
        defer { daemon.stop() }
        XCTAssertNil(try XCTUnwrap(daemon.notify).waitFor("WATCHDOG=1", timeout: 1.0))
    }

    func testSighupAppliesANewConfigAndKeepsUnchangedSegments() async throws {
        let daemon = try TestDaemon(segments: [segment("keep", size: 128), segment("drop", size: 128), segment("grow", size: 16)],
                                    withNotifySocket: true)
        defer { daemon.stop() }
        let notify = try XCTUnwrap(daemon.notify)
        let client = try await daemon.connect()
        let kept = try await client.publish("keep", bytes: Array("survives reload".utf8))
        try await client.publish("grow", bytes: Array("first".utf8))
        try await client.publish("grow", bytes: Array("small".utf8))
        let dropHandle = try await client.open("drop")
        let dropEvents = try await client.subscribe("drop")

        try daemon.rewriteConfig(segments: [segment("keep", size: 128, readers: [0]), segment("grow", size: 4096), segment("new", size: 64)])
        daemon.child.signal(SIGHUP)
        XCTAssertNotNil(notify.waitFor("RELOADING=1"))
        let ready = try XCTUnwrap(notify.waitFor("READY=1"))
        XCTAssertTrue(ready.contains("STATUS=serving 3 segments"), ready)

        let report = try await client.status()
        XCTAssertEqual(report.segments.map(\.name), ["keep", "grow", "new"])
        XCTAssertEqual(report.counters.reloads, 1)
        let keep = try await client.open("keep")
        let snapshot = try XCTUnwrap(try keep.read())
        XCTAssertEqual(snapshot.version, kept.version, "an unchanged segment keeps its version")
        XCTAssertEqual(snapshot.bytes, Array("survives reload".utf8))
        let grown = try await client.open("grow")
        XCTAssertEqual(grown.capacity, 4096)
        let carried = try XCTUnwrap(try grown.read())
        XCTAssertEqual(carried.bytes, Array("small".utf8), "a resized segment carries its content over")
        XCTAssertEqual(carried.version, 2, "under its own version number, not as a new version 1")
        try await client.publish("new", bytes: [1])

        XCTAssertTrue(dropHandle.isRetired, "readers of a removed segment see it retired in shared memory")
        var iterator = dropEvents.makeAsyncIterator()
        let event = await iterator.next()
        XCTAssertEqual(event, .retired)
        do {
            _ = try await client.open("drop")
            XCTFail("a removed segment can still be opened")
        } catch {
            XCTAssertEqual(error.code, .noSuchSegment)
        }
    }

    func testInvalidConfigOnSighupIsRejectedAndTheOldOneKeepsRunning() async throws {
        let daemon = try TestDaemon(segments: [segment("steady", size: 64)], withNotifySocket: true)
        defer { daemon.stop() }
        let notify = try XCTUnwrap(daemon.notify)
        let client = try await daemon.connect()
        try await client.publish("steady", bytes: Array("v1".utf8))

        try Data(#"{"socket": {"path": "/tmp/x.sock"}, "segments": [{"name": "bad name!", "size": "lots"}], "extra": 1}"#.utf8)
            .write(to: URL(fileURLWithPath: daemon.configPath))
        daemon.child.signal(SIGHUP)
        let ready = try XCTUnwrap(notify.waitFor("READY=1"))
        XCTAssertTrue(ready.contains("reload failed"), ready)
        XCTAssertTrue(daemon.child.stderrText.contains("$.segments[0].name"), "the journal names each problem: \(daemon.child.stderrText)")
        XCTAssertTrue(daemon.child.stderrText.contains("$.extra"))

        let report = try await client.status()
        XCTAssertEqual(report.counters.failedReloads, 1)
        XCTAssertEqual(report.segments.map(\.name), ["steady"])
        let receipt = try await client.publish("steady", bytes: Array("v2".utf8))
        XCTAssertEqual(receipt.version, 2)
    }

    func testSubscriberReconnectsByItselfAcrossADaemonRestart() async throws {
        let daemon = try TestDaemon(segments: [segment("feed", size: 64)])
        defer { daemon.stop() }
        let subscriber = try await daemon.connect()
        let subscription = try await subscriber.subscribe("feed")
        var events = subscription.makeAsyncIterator()
        let producer = try await ShmBrokerClient.connect(socketPath: daemon.socketPath, options: .init(reconnects: false))
        let before = try await producer.publish("feed", bytes: [1])
        let first = await events.next()
        XCTAssertEqual(first, .version(before))

        try daemon.restart()
        // Without systemd's fd store the new daemon starts its segments afresh; the subscriber's
        // code does nothing, yet it hears about the new daemon's versions.
        let fresh = try await daemon.connect()
        try await waitUntil { try await fresh.status().segments.first?.subscribers == 1 }
        let after = try await fresh.publish("feed", bytes: [2])
        let second = await events.next()
        XCTAssertEqual(second, .version(after))
        let status = try await subscriber.status()
        XCTAssertEqual(status.daemon.pid, daemon.pid, "requests go to the new daemon")

        // A client that asked not to reconnect reports the loss instead.
        do {
            _ = try await producer.status()
            XCTFail("a non-reconnecting client survived the restart")
        } catch {
            XCTAssertEqual(error, .disconnected)
        }
    }

    /// A request made while the daemon stays away fails once the client's bound has passed,
    /// instead of waiting for a reconnection that never comes (`shmbrokerctl top` hung so).
    func testARequestWhileTheDaemonStaysAwayFailsAfterTheBound() async throws {
        let daemon = try TestDaemon(segments: [segment("feed", size: 64)])
        let client = try await ShmBrokerClient.connect(
            socketPath: daemon.socketPath, options: .init(reconnects: true, requestWaitForReconnectionNanoseconds: 500_000_000))
        _ = try await client.status()
        daemon.stop()
        // Unstructured, so that a request that never returns (the defect) fails the test instead
        // of holding it.
        let outcome = Mutex<String?>(nil)
        Task.detached {
            do {
                _ = try await client.status()
                outcome.withLock { $0 = "answered" }
            } catch {
                outcome.withLock { $0 = "\(error)" }
            }
        }
        let deadline = Date().addingTimeInterval(20)
        while outcome.withLock({ $0 }) == nil && Date() < deadline { try await Task.sleep(nanoseconds: 20_000_000) }
        XCTAssertEqual(outcome.withLock { $0 } ?? "still waiting after 20 s", "\(ShmBrokerClientError.disconnected)")
        client.close()
    }

    func testCheckConfigReportsEveryProblemAndDoesNotStart() throws {
        let directory = NSTemporaryDirectory() + "shmbroker-check-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/bad.json"
        try Data(#"""
        {"socket": {"path": "/tmp/shmbroker-never.sock", "mode": "rw"},
         "segments": [{"name": "a", "size": "1MiB"}, {"name": "a", "size": 10},
                      {"name": "b", "size": "-3", "readers": {"users": ["no-such-user-xyz"]}}]}
        """#.utf8).write(to: URL(fileURLWithPath: path))
        let result = try runToCompletion(Binaries.daemon, ["--config", path, "--check-config"])
        XCTAssertEqual(result.status, 1)
        for expected in ["$.socket.mode", "$.segments[1].name: duplicate segment name \"a\"", "$.segments[2].size",
                         "$.segments[2].readers.users[0]: unknown user \"no-such-user-xyz\""] {
            XCTAssertTrue(result.stderr.contains(expected), "missing \(expected) in: \(result.stderr)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/tmp/shmbroker-never.sock"))

        let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("config")
        for name in ["example.json", "shmbroker.json"] {
            let good = try runToCompletion(Binaries.daemon, ["--config", examples.appendingPathComponent(name).path, "--check-config"])
            XCTAssertEqual(good.status, 0, "\(name): \(good.stderr)")
        }
    }
}
