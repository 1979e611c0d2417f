import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerProtocol
import XCTest

/// Publish, read and subscribe across real processes: the daemon, the CLI and library clients.
final class EndToEndTests: XCTestCase {
    func testPublishReadAndSubscribeAcrossProcesses() async throws {
        let daemon = try TestDaemon(segments: [segment("state", size: "4KiB")])
        defer { daemon.stop() }

        // A watcher process subscribes before anything is published.
        let watcher = try ChildProcess(Binaries.ctl, ["watch", "state", "--count", "2", "--json", "--socket", daemon.socketPath])
        let client = try await daemon.connect()
        try await waitUntil { try await client.status().segments.first?.subscribers == 1 }

        // A reader process sees "never published" as its own exit status, not as empty content.
        let empty = try runToCompletion(Binaries.ctl, ["read", "state", "--socket", daemon.socketPath])
        XCTAssertEqual(empty.status, 3, empty.stderr)
        XCTAssertTrue(empty.stderr.contains("nothing has been published"), empty.stderr)

        // A producer process publishes from stdin; another reads it back.
        let published = try runToCompletion(Binaries.ctl, ["publish", "state", "-", "--json", "--socket", daemon.socketPath], stdin: Data("first".utf8))
        XCTAssertEqual(published.status, 0, published.stderr)
        XCTAssertTrue(published.stdout.contains("\"version\":1"), published.stdout)
        let second = try await client.publish("state", bytes: Array("second version".utf8))
        XCTAssertEqual(second.version, 2)

        let read = try runToCompletion(Binaries.ctl, ["read", "state", "--socket", daemon.socketPath])
        XCTAssertEqual(read.status, 0, read.stderr)
        XCTAssertEqual(read.stdout, "second version")

        let watched = watcher.finish(timeout: 30)
        XCTAssertEqual(watched.status, 0, watched.stderr)
        let versions = watched.stdout.split(separator: "\n").compactMap { line -> Int? in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["version"] as? Int
        }
        XCTAssertEqual(versions, [1, 2])

        // The library's mapping reads the same bytes with a verified CRC.
        let handle = try await client.open("state")
        let snapshot = try XCTUnwrap(try handle.read())
        XCTAssertEqual(snapshot.version, 2)
        XCTAssertEqual(snapshot.crc64, second.crc64)
        XCTAssertEqual(String(decoding: snapshot.bytes, as: UTF8.self), "second version")

        // An empty payload is a version of its own, distinct from "never published".
        let emptyVersion = try await client.publish("state", bytes: [])
        XCTAssertEqual(emptyVersion.version, 3)
        let emptySnapshot = try XCTUnwrap(try handle.read())
        XCTAssertEqual(emptySnapshot.version, 3)
        XCTAssertEqual(emptySnapshot.bytes, [])
        let emptyRead = try runToCompletion(Binaries.ctl, ["read", "state", "--socket", daemon.socketPath])
        XCTAssertEqual(emptyRead.status, 0, emptyRead.stderr)
        XCTAssertEqual(emptyRead.stdout, "")
    }

    func testLibrarySubscriptionDeliversEveryVersionToAPromptReader() async throws {
        let daemon = try TestDaemon(segments: [segment("ticks", size: 64)])
        defer { daemon.stop() }
        let producer = try await daemon.connect()
        let consumer = try await daemon.connect()
        let subscription = try await consumer.subscribe("ticks")
        XCTAssertEqual(subscription.initialVersion, 0)
        let handle = try await consumer.open("ticks")
        var iterator = subscription.makeAsyncIterator()
        for index in 1...20 {
            let receipt = try await producer.publish("ticks", bytes: Array("tick \(index)".utf8))
            guard case .version(let info)? = await iterator.next() else { return XCTFail("subscription ended") }
            XCTAssertEqual(info.version, receipt.version)
            XCTAssertEqual(info.crc64, receipt.crc64)
            XCTAssertEqual(try handle.read()?.bytes, Array("tick \(index)".utf8))
        }
    }

    func testFutexWaiterInAnotherProcessWakesOnPublish() async throws {
        let daemon = try TestDaemon(segments: [segment("signal", size: 128)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("signal", bytes: Array("before".utf8))
        let waiter = try ChildProcess(Binaries.testKit, ["wait-version", "--socket", daemon.socketPath, "--segment", "signal", "--timeout", "60"])
        XCTAssertTrue(waiter.waitForStderr("waiting after 1"), waiter.stderrText)
        try await client.publish("signal", bytes: Array("after".utf8))
        let result = waiter.finish(timeout: 60)
        XCTAssertEqual(result.status, 0, result.stderr)
        let json = try result.json()
        XCTAssertEqual(json["before"] as? Int, 1)
        XCTAssertEqual(json["after"] as? Int, 2)
        XCTAssertEqual(json["content"] as? String, "after")
    }

    func testLargePayloadTravelsAsAttachedMemfdAndOversizeIsRefusedWithCapacity() async throws {
        let daemon = try TestDaemon(segments: [segment("blob", size: "1MiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        var generator = SystemRandomNumberGenerator()
        let payload = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let receipt = try await client.publish("blob", bytes: payload)
        XCTAssertEqual(receipt.length, payload.count)

        do {
            try await client.publish("blob", bytes: payload + [0])
            XCTFail("an oversize payload was accepted")
        } catch {
            XCTAssertEqual(error.code, .payloadTooLarge)
            XCTAssertTrue("\(error)".contains("1048576"), "the error states the capacity: \(error)")
        }
        let handle = try await client.open("blob")
        let snapshot = try XCTUnwrap(try handle.read())
        XCTAssertEqual(snapshot.version, 1, "nothing was written by the refused publish")
        XCTAssertEqual(snapshot.bytes, payload)

        let file = daemon.directory + "/payload.bin"
        try Data(payload.reversed()).write(to: URL(fileURLWithPath: file))
        let cli = try runToCompletion(Binaries.ctl, ["publish", "blob", file, "--socket", daemon.socketPath])
        XCTAssertEqual(cli.status, 0, cli.stderr)
        let out = daemon.directory + "/out.bin"
        let readBack = try runToCompletion(Binaries.ctl, ["read", "blob", "-o", out, "--socket", daemon.socketPath])
        XCTAssertEqual(readBack.status, 0, readBack.stderr)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), Data(payload.reversed()))
    }


    /// `shmbrokerctl publish --lines` feeds a segment from a pipeline: one version per line, and a
    /// line longer than the segment is refused by number while the lines before it stay published.
    func testCtlPublishesEachLineOfAStream() async throws {
        let daemon = try TestDaemon(segments: [segment("feed", size: 16)])
        defer { daemon.stop() }
        let input = (1...1000).map { "line \($0)" }.joined(separator: "\n") + "\n"
        let streamed = try runToCompletion(Binaries.ctl, ["publish", "feed", "--lines", "--json", "--socket", daemon.socketPath],
                                           stdin: Data(input.utf8))
        XCTAssertEqual(streamed.status, 0, streamed.stderr)
        let receipt = try streamed.json()
        XCTAssertEqual(receipt["published"] as? Int, 1000)
        XCTAssertEqual(receipt["version"] as? Int, 1000)
        let client = try await daemon.connect()
        let handle = try await client.open("feed")
        XCTAssertEqual(try handle.read()?.bytes, Array("line 1000".utf8))

        let tooLong = try runToCompletion(Binaries.ctl, ["publish", "feed", "--lines", "--socket", daemon.socketPath],
                                          stdin: Data("ok 1\nok 2\nthis line is longer than sixteen bytes\nnever\n".utf8))
        XCTAssertEqual(tooLong.status, 1)
        XCTAssertTrue(tooLong.stderr.contains("line 3") && tooLong.stderr.contains("capacity of 16"), tooLong.stderr)
        try await waitUntil { handle.latestVersion == 1002 }
        XCTAssertEqual(try handle.read()?.bytes, Array("ok 2".utf8), "the lines before the refused one were published")
    }

    /// The library reuses its mapped staging files: payloads that grow, shrink and grow again
    /// (several in flight at once) must each arrive as exactly their own bytes, never with a tail
    /// left from a longer earlier payload or a head from a concurrent one.
    func testReusedStagingFilesCarryExactlyEachPayload() async throws {
        let daemon = try TestDaemon(segments: [segment("blob", size: "2MiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let handle = try await client.open("blob")
        let lengths = [70_000, 1 << 20, 66_000, (2 << 20) - 1, 100_000, 65_537, 2 << 20]
        for (round, length) in lengths.enumerated() {
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ round) }
            let receipt = try await client.publish("blob", bytes: payload)
            XCTAssertEqual(receipt.length, length, "round \(round)")
            XCTAssertEqual(try handle.read()?.bytes, payload, "round \(round)")
        }
        // Eight concurrent publishes of distinct sizes: each receipt's CRC is its own payload's.
        let receipts = try await withThrowingTaskGroup(of: (Int, PublishReceipt).self) { group in
            for lane in 0..<8 {
                group.addTask {
                    let payload = [UInt8](repeating: UInt8(lane), count: 80_000 + lane * 30_000)
                    return (lane, try await client.publish("blob", bytes: payload))
                }
            }
            return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
        }
        for (lane, receipt) in receipts {
            let payload = [UInt8](repeating: UInt8(lane), count: 80_000 + lane * 30_000)
            XCTAssertEqual(receipt.crc64, CRC64.checksum(payload), "lane \(lane)")
            XCTAssertEqual(receipt.length, payload.count, "lane \(lane)")
        }
    }
    func testStatusReportsSegmentsClientsAndCounters() async throws {
        let daemon = try TestDaemon(segments: [segment("a", size: 100), segment("b", size: "2KiB", slots: 4)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        _ = try await client.open("a")
        _ = try await client.subscribe("b")
        try await client.publish("a", bytes: [1, 2, 3])
        let report = try await client.status()
        XCTAssertEqual(report.segments.map(\.name), ["a", "b"])
        XCTAssertEqual(report.segments[0].version, 1)
        XCTAssertEqual(report.segments[0].length, 3)
        XCTAssertEqual(report.segments[0].readers, 1)
        XCTAssertNotNil(report.segments[0].lastPublishedAt)
        XCTAssertEqual(report.segments[1].capacity, 2048)
        XCTAssertEqual(report.segments[1].slots, 4)
        XCTAssertEqual(report.segments[1].subscribers, 1)
        XCTAssertNil(report.segments[1].lastPublishedAt)
        XCTAssertEqual(report.daemon.pid, daemon.pid)
        XCTAssertEqual(report.counters.publishes, 1)

        let cli = try runToCompletion(Binaries.ctl, ["status", "--json", "--socket", daemon.socketPath])
        XCTAssertEqual(cli.status, 0, cli.stderr)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(cli.stdout.utf8)) as? [String: Any])
        XCTAssertEqual((json["segments"] as? [[String: Any]])?.count, 2)
        // The CLI finds the socket through the daemon's config, as the daemon does.
        let viaConfig = try runToCompletion(Binaries.ctl, ["list", "--config", daemon.configPath])
        XCTAssertEqual(viaConfig.status, 0, viaConfig.stderr)
        XCTAssertTrue(viaConfig.stdout.contains("a ") && viaConfig.stdout.contains("b "), viaConfig.stdout)
    }

    func testCapacitiesFromOneByteToOneGibibyte() async throws {
        let daemon = try TestDaemon(segments: [segment("tiny", size: 1), segment("huge", size: "1GiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("tiny", bytes: [42])
        do {
            try await client.publish("tiny", bytes: [1, 2])
            XCTFail("two bytes fit a one-byte segment")
        } catch {
            XCTAssertEqual(error.code, .payloadTooLarge)
        }
        let tiny = try await client.open("tiny")
        XCTAssertEqual(try tiny.read()?.bytes, [42])

        let huge = try await client.open("huge")
        XCTAssertEqual(huge.capacity, 1 << 30)
        let payload = [UInt8](repeating: 0xEE, count: 3 << 20)
        try await client.publish("huge", bytes: payload)
        XCTAssertEqual(try huge.read()?.bytes, payload)
        let report = try await client.status()
        XCTAssertEqual(report.segments.map(\.capacity), [1, 1 << 30])
    }

    func testStatusOfAThousandSegmentsExceedsAFrameAndStillArrivesWhole() async throws {
        let daemon = try TestDaemon(segments: (0..<1200).map { segment("segment-\($0)", size: 64) })
        defer { daemon.stop() }
        let client = try await daemon.connect()
        try await client.publish("segment-1199", bytes: [9])
        let json = try await client.statusJSON()
        XCTAssertGreaterThan(json.count, 65_536, "large enough to need the memfd route")
        let report = try StatusReport.decode(json)
        XCTAssertEqual(report.segments.count, 1200)
        XCTAssertEqual(report.segments.last?.version, 1)
        let cli = try runToCompletion(Binaries.ctl, ["list", "--json", "--socket", daemon.socketPath])
        XCTAssertEqual(cli.status, 0, cli.stderr)
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(cli.stdout.utf8)) as? [Any])?.count, 1200)
    }
}

/// Polls an async condition (for state another process changes), failing after `timeout`.
func waitUntil(timeout: Double = 30, file: StaticString = #filePath, line: UInt = #line, _ condition: () async throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try await condition() { return }
        try await Task.sleep(nanoseconds: 20_000_000)
    }
    XCTFail("condition not met within \(timeout)s", file: file, line: line)
}
