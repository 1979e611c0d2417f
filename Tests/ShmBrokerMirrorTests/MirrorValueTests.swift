import Foundation
import ShmBrokerCore
@testable import ShmBrokerMirror
import XCTest

/// The bucket's value format: what an exporter writes reads back, and every hostile value is
/// refused with its cause before anything is allocated or served.
final class MirrorValueTests: XCTestCase {
    let chunkSize = 4096

    func encoded(_ value: MirrorValue, _ payload: [UInt8]) -> [UInt8] {
        payload.withUnsafeBytes { value.encoded(payload: $0) }
    }

    func decode(_ bytes: [UInt8], capacity: Int = 1 << 20) throws(MirrorValueError) -> MirrorValue {
        let outcome = bytes.withUnsafeBytes { buffer in
            Result { () throws(MirrorValueError) in try MirrorValue.decode(buffer, capacity: capacity, chunkSize: chunkSize) }
        }
        return try outcome.get()
    }

    func cause(_ bytes: [UInt8], capacity: Int = 1 << 20) -> String? {
        do {
            _ = try decode(bytes, capacity: capacity)
            return nil
        } catch {
            return error.cause
        }
    }

    func testAWholeValueRoundTrips() throws {
        let payload = Array("hello".utf8)
        let value = MirrorValue(kind: .whole, epoch: 7, version: 42, crc64: CRC64.checksum(payload), length: 5,
                                publishedAtNanoseconds: 99, writer: 1234)
        let bytes = encoded(value, payload)
        XCTAssertEqual(bytes.count, MirrorValue.headerSize + 5)
        XCTAssertEqual(Array(bytes[0..<8]), Array("SHMBMIR1".utf8), "the magic reads as text in a hex dump")
        XCTAssertEqual(try decode(bytes), value)
    }

    func testChunkCountsFollowTheLength() {
        XCTAssertEqual(MirrorValue.chunkCount(length: 0, chunkSize: 4096), 1)
        XCTAssertEqual(MirrorValue.chunkCount(length: 4096, chunkSize: 4096), 1)
        XCTAssertEqual(MirrorValue.chunkCount(length: 4097, chunkSize: 4096), 2)
        XCTAssertEqual(MirrorValue.chunkCount(length: 16 << 20, chunkSize: (1 << 20) - 4096), 17)
    }

    func testHostileValuesAreRefusedWithTheirCause() {
        let good = MirrorValue(kind: .whole, epoch: 1, version: 3, crc64: 0, length: 5, publishedAtNanoseconds: 0)
        var bytes = encoded(good, Array("hello".utf8))
        XCTAssertNil(cause(bytes))
        XCTAssertEqual(cause(Array(bytes.prefix(10))), "truncated")
        bytes[0] = UInt8(ascii: "X")
        XCTAssertEqual(cause(bytes), "bad-magic")

        var header = good
        header.version = 0
        XCTAssertEqual(cause(encoded(header, Array("hello".utf8))), "zero-version")
        header = good
        header.length = 1 << 40
        XCTAssertEqual(cause(encoded(header, [])), "too-large", "a huge length is refused before any allocation")
        XCTAssertEqual(cause(encoded(good, Array("hello".utf8)), capacity: 4), "too-large", "the local capacity bounds it")
        header = good
        header.length = 6
        XCTAssertEqual(cause(encoded(header, Array("hello".utf8))), "length-mismatch")
        header = good
        header.chunkCount = 3
        XCTAssertEqual(cause(encoded(header, Array("hello".utf8))), "bad-chunking")

        var unknown = encoded(good, Array("hello".utf8))
        unknown[12] = 9
        XCTAssertEqual(cause(unknown), "unknown-kind")
        var size = encoded(good, Array("hello".utf8))
        size[8] = 64
        XCTAssertEqual(cause(size), "bad-header-size")
    }

    func testCommitsAndChunksMustAgreeWithTheChunkSize() {
        let length: UInt64 = 10_000  // three chunks of 4096
        let commit = MirrorValue(kind: .commit, epoch: 1, version: 2, crc64: 0, length: length, publishedAtNanoseconds: 0, chunkCount: 3)
        XCTAssertNil(cause(encoded(commit, [])))
        var wrong = commit
        wrong.chunkCount = 1000
        XCTAssertEqual(cause(encoded(wrong, [])), "bad-chunking", "a count that does not match the length")
        XCTAssertEqual(cause(encoded(commit, [1])), "length-mismatch", "a commit carries no bytes")

        let last = MirrorValue(kind: .chunk, epoch: 1, version: 2, crc64: 0, length: length, publishedAtNanoseconds: 0,
                               chunkIndex: 2, chunkCount: 3)
        XCTAssertNil(cause(encoded(last, [UInt8](repeating: 0, count: 10_000 - 8192))))
        XCTAssertEqual(cause(encoded(last, [UInt8](repeating: 0, count: 4096))), "length-mismatch", "the last chunk holds the rest")
        var beyond = last
        beyond.chunkIndex = 3
        XCTAssertEqual(cause(encoded(beyond, [])), "bad-chunking")
    }

    func testKeysOfDifferentSegmentsNeverMeet() {
        XCTAssertEqual(MirrorKeys.value(host: "a", segment: "frames"), "a.seg.frames")
        XCTAssertNotEqual(MirrorKeys.chunk(host: "a", segment: "x.1", index: 0), MirrorKeys.chunk(host: "a", segment: "x", index: 10))
        XCTAssertNotEqual(MirrorKeys.value(host: "a", segment: "chunk.x.1"), MirrorKeys.chunk(host: "a", segment: "x", index: 1))
    }

    func testHeartbeatsAreCheckedAsHostile() {
        let beat = Heartbeat(host: "a", sentAtNanoseconds: 5, segments: ["s": .init(epoch: 1, version: 2, available: true)])
        let bytes = beat.encoded()
        XCTAssertEqual(bytes.withUnsafeBytes { Heartbeat.decode($0, expectedHost: "a") }, beat)
        XCTAssertNil(bytes.withUnsafeBytes { Heartbeat.decode($0, expectedHost: "b") }, "a heartbeat must name the host of its subject")
        XCTAssertNil(Array("{not json".utf8).withUnsafeBytes { Heartbeat.decode($0, expectedHost: "a") })
        let huge = [UInt8](repeating: 0x20, count: Heartbeat.maximumSize + 1)
        XCTAssertNil(huge.withUnsafeBytes { Heartbeat.decode($0, expectedHost: "a") })
    }
}
