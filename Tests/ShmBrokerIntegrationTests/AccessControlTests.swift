import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerProtocol
import XCTest

/// Access control by peer credentials, and the read-only guarantee of segment memory, checked with
/// clients running as another uid (`nobody`).
final class AccessControlTests: XCTestCase {
    func testUnauthorisedUidIsRefusedAndAuthorisedUidReads() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [
            segment("private", size: 64, readers: [0]),
            segment("public", size: 64, readers: ["*"]),
        ])
        defer { daemon.stop() }
        let root = try await daemon.connect()
        try await root.publish("private", bytes: Array("secret".utf8))
        try await root.publish("public", bytes: Array("hello".utf8))

        let refused = try runToCompletion(Binaries.ctl, ["read", "private", "--socket", daemon.socketPath], asNobody: true)
        XCTAssertNotEqual(refused.status, 0)
        // A segment nobody may not read is answered like one that does not exist (its name is secret too).
        XCTAssertTrue(refused.stderr.contains("no-such-segment"), refused.stderr)
        XCTAssertFalse(refused.stdout.contains("secret"))

        let subscribeRefused = try runToCompletion(Binaries.ctl, ["watch", "private", "--count", "1", "--socket", daemon.socketPath], asNobody: true)
        XCTAssertTrue(subscribeRefused.stderr.contains("no-such-segment"), subscribeRefused.stderr)

        let publishRefused = try runToCompletion(Binaries.ctl, ["publish", "public", "-", "--socket", daemon.socketPath],
                                                 asNobody: true, stdin: Data("vandal".utf8))
        XCTAssertTrue(publishRefused.stderr.contains("permission-denied"), publishRefused.stderr)

        // Positive control: the same uid, the same socket, an allowed segment.
        let allowed = try runToCompletion(Binaries.ctl, ["read", "public", "--socket", daemon.socketPath], asNobody: true)
        XCTAssertEqual(allowed.status, 0, allowed.stderr)
        XCTAssertEqual(allowed.stdout, "hello")
        let status = try await root.status()
        XCTAssertEqual(status.segments.first { $0.name == "public" }?.version, 1, "the refused publish wrote nothing")
    }

    func testPublisherAccessListAdmitsANamedUid() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("feed", size: 64, readers: ["*"], publishers: ["nobody"])])
        defer { daemon.stop() }
        let published = try runToCompletion(Binaries.ctl, ["publish", "feed", "-", "--socket", daemon.socketPath],
                                            asNobody: true, stdin: Data("from nobody".utf8))
        XCTAssertEqual(published.status, 0, published.stderr)
        let client = try await daemon.connect()
        let handle = try await client.open("feed")
        XCTAssertEqual(try handle.read()?.bytes, Array("from nobody".utf8))
    }

    func testReaderOfAnotherUidCannotWriteSegmentMemoryByAnyRoute() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("guarded", size: 4096)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let receipt = try await client.publish("guarded", bytes: Array(repeating: 7, count: 1000))

        let attack = try runToCompletion(Binaries.testKit, ["attack", "--socket", daemon.socketPath, "--segment", "guarded"], asNobody: true)
        XCTAssertEqual(attack.status, 0, attack.stderr)
        let outcome = try attack.json()
        XCTAssertEqual(outcome["uid"] as? String, "65534")
        XCTAssertEqual(outcome["mmapWritable"] as? String, "errno \(EACCES)", "writable mmap of the received fd")
        XCTAssertEqual(outcome["mprotectWritable"] as? String, "errno \(EACCES)", "mprotect of a read-only mapping")
        XCTAssertEqual(outcome["write"] as? String, "errno \(EBADF)", "write() on the received fd")
        XCTAssertEqual(outcome["ftruncate"] as? String, "errno \(EINVAL)", "ftruncate to 0")
        XCTAssertEqual(outcome["ftruncateGrow"] as? String, "errno \(EINVAL)", "ftruncate to twice the size")
        XCTAssertEqual(outcome["reopenReadWrite"] as? String, "errno \(EACCES)", "reopen /proc/self/fd/N O_RDWR")
        XCTAssertEqual(outcome["fchmod"] as? String, "errno \(EPERM)", "fchmod of the segment")
        XCTAssertEqual(outcome["reopenAfterFchmod"] as? String, "errno \(EACCES)", "reopen after the fchmod attempt")

        let handle = try await client.open("guarded")
        let after = try XCTUnwrap(try handle.read())
        XCTAssertEqual(after.version, receipt.version)
        XCTAssertEqual(after.crc64, receipt.crc64)
        XCTAssertEqual(after.bytes, Array(repeating: 7, count: 1000))
    }
}
