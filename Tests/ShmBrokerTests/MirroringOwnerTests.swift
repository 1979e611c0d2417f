import Foundation
import Glibc
@testable import ShmBroker
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerProtocol
import XCTest

/// The owner features a mirror builds on, with a real owner in this process and real clients on
/// its socket: publishing at a given version, the stale flag, STATUS's mirror fields, STALENESS
/// events, and starting a segment over for a new source epoch.
final class MirroringOwnerTests: XCTestCase {
    var directory = ""

    override func setUp() {
        directory = "/tmp/shmbroker-mirror-owner-test-\(getpid())-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    var socketPath: String { directory + "/control.sock" }

    func makeOwner(slots: Int = 4) throws -> ShmBrokerOwner {
        let path = directory + "/owner.json"
        try OwnerTests.config(socketPath: socketPath, segments: """
            {"name": "remote", "size": 4096, "slots": \(slots), "readers": {"users": ["*"]}}
            """).write(toFile: path, atomically: true, encoding: .utf8)
        return try ShmBrokerOwner(configPath: path, options: .init(handlesSignals: false, adoptsSystemdDescriptors: false))
    }

    func publish(_ owned: OwnedSegment, _ text: String, at version: UInt64, crc: UInt64? = nil) throws -> PublishReceipt {
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBytes { buffer in
            try owned.publish(buffer, atVersion: version, expectedCRC: crc ?? CRC64.checksum(buffer),
                              publishedAtNanoseconds: 1_700_000_000_000_000_000 + version)
        }
    }

    func testVersionsAreTheSourcesNeverGoBackAndAMismatchedCRCPublishesNothing() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("remote")
        try owner.start()
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "mirror-owner-test")
        let handle = try await client.open("remote")

        let first = try publish(owned, "at seven", at: 7)
        XCTAssertEqual(first.version, 7)
        var snapshot = try XCTUnwrap(try handle.read())
        XCTAssertEqual(snapshot.version, 7, "readers see the source's number")
        XCTAssertEqual(snapshot.bytes, Array("at seven".utf8))
        XCTAssertEqual(snapshot.publishedAtNanoseconds, 1_700_000_000_000_000_007, "and the source's publish time")

        for stale in [7, 3] as [UInt64] {
            XCTAssertThrowsError(try publish(owned, "old", at: stale)) { error in
                XCTAssertEqual((error as? OwnerError)?.code, "version-not-after-latest", "\(error)")
            }
        }
        // A wrong CRC, into another slot and into the latest version's own slot (7 + 4 slots):
        // nothing becomes visible, and the latest version stays readable.
        for version in [9, 11] as [UInt64] {
            XCTAssertThrowsError(try publish(owned, "corrupted", at: version, crc: 0x1234)) { error in
                XCTAssertEqual((error as? OwnerError)?.code, "checksum-mismatch", "\(error)")
            }
            snapshot = try XCTUnwrap(try handle.read())
            XCTAssertEqual(snapshot.version, 7)
            XCTAssertEqual(snapshot.bytes, Array("at seven".utf8))
        }
        _ = try publish(owned, "at eleven", at: 11)
        XCTAssertEqual(try handle.read()?.version, 11)
        XCTAssertEqual(try owned.publish(Array("local".utf8)).version, 12, "a plain publish continues from it")
    }

    func testStalenessReachesTheHeaderStatusAndSubscribers() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("remote")
        try owner.start()
        _ = try publish(owned, "v5", at: 5)
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "mirror-owner-test")
        let handle = try await client.open("remote")
        var events = try await client.subscribe("remote").makeAsyncIterator()
        XCTAssertFalse(handle.isStale)
        let before = try await client.status()
        XCTAssertNil(before.segments.first?.mirror, "no mirror state before the mirror reports one")

        let heartbeat = Date()
        var state = MirrorState(sourceHost: "a", sourceSegment: "frames", sourceEpoch: 42, sourceVersion: 8,
                                behindSince: heartbeat.addingTimeInterval(-2), staleSince: heartbeat, lastHeartbeatAt: heartbeat)
        try owner.updateMirror("remote", state)
        XCTAssertTrue(handle.isStale, "the header flag is up as soon as updateMirror returns")
        XCTAssertEqual(try handle.read()?.version, 5, "the last good version stays readable")
        let during = try await client.status()
        let mirror = try XCTUnwrap(during.segments.first?.mirror)
        XCTAssertEqual(mirror.sourceHost, "a")
        XCTAssertEqual(mirror.sourceSegment, "frames")
        XCTAssertEqual(mirror.sourceEpoch, 42)
        XCTAssertEqual(mirror.sourceVersion, 8)
        XCTAssertEqual(mirror.lagVersions, 3)
        XCTAssertGreaterThanOrEqual(mirror.lagSeconds, 2)
        XCTAssertTrue(mirror.stale)
        XCTAssertEqual(try XCTUnwrap(mirror.staleSince), heartbeat.timeIntervalSince1970, accuracy: 0.001)
        var seen = await events.next()
        XCTAssertEqual(seen, .stale)

        // Reporting stale again sends nothing; fresh clears the flag and says so once.
        try owner.updateMirror("remote", state)
        state.staleSince = nil
        state.behindSince = nil
        _ = try publish(owned, "v8", at: 8)
        try owner.updateMirror("remote", state)
        XCTAssertFalse(handle.isStale)
        while let event = await events.next() {
            seen = event
            if case .version = event { continue }
            break
        }
        XCTAssertEqual(seen, .fresh)
        let after = try await client.status()
        XCTAssertEqual(after.segments.first?.mirror?.lagVersions, 0)

        XCTAssertThrowsError(try owner.updateMirror("unclaimed", state)) { error in
            XCTAssertEqual((error as? OwnerError)?.code, "no-such-segment")
        }
    }

    func testRenewRetiresTheOldMemoryAndStartsOverAtVersionZero() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("remote")
        try owner.start()
        _ = try publish(owned, "epoch one", at: 900)
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "mirror-owner-test")
        let old = try await client.open("remote")
        try owner.updateMirror("remote", MirrorState(sourceHost: "a", sourceSegment: "s", sourceEpoch: 1, sourceVersion: 900,
                                                     staleSince: Date()))

        try owner.renew("remote")
        XCTAssertTrue(old.isRetired, "readers of the old memory see it retired")
        let renewed = try await client.open("remote")
        XCTAssertNil(try renewed.read(), "the new segment starts empty")
        XCTAssertTrue(renewed.isStale, "and keeps the staleness until the mirror says otherwise")
        XCTAssertEqual(try publish(owned, "epoch two", at: 3).version, 3, "the same handle publishes the new epoch's numbers")
        XCTAssertEqual(try renewed.read()?.bytes, Array("epoch two".utf8))
    }
}
