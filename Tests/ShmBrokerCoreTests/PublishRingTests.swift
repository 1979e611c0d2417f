import Foundation
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage
import XCTest

/// The ring's two ends in one process, over one real memfd mapped twice (as producer and daemon
/// map it), with a real segment as the destination.
final class PublishRingCoreTests: XCTestCase {
    struct Ring {
        let file: FileDescriptor
        let producer: PublishRingProducer
        let consumer: PublishRingConsumer
        let consumerRegion: MappedRegion
    }

    func makeRing(dataSize: Int = 8192) throws -> Ring {
        let file = try MemoryFile.createScratch(name: "ring-test", sealedAgainstShrinking: true)
        try file.setSize(PublishRingLayout.headerSize + dataSize)
        let producerRegion = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + dataSize, writable: true)
        let producer = PublishRingProducer(formatting: producerRegion, dataSize: dataSize)
        let consumerRegion = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + dataSize, writable: true)
        return Ring(file: file, producer: producer, consumer: try PublishRingConsumer(region: consumerRegion), consumerRegion: consumerRegion)
    }

    func makeSegment(capacity: Int) throws -> (SegmentWriter, SegmentReader, FileDescriptor) {
        let layout = SegmentLayout(capacity: capacity, slotCount: 3)
        let file = try MemoryFile.create(name: "ring-target", size: layout.totalSize, mode: 0o600)
        let region = try MappedRegion(mapping: file, length: layout.totalSize, writable: true)
        let writer = SegmentWriter(formatting: region, layout: layout, name: "target")
        return (writer, try SegmentReader(region: region), file)
    }

    /// The header offsets are the ones the table in docs/LAYOUT.md gives, field by field.
    func testHeaderMatchesTheDocumentedTable() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/LAYOUT.md")
        let document = try String(contentsOf: url, encoding: .utf8)
        let section = try XCTUnwrap(document.range(of: "## Ring header")).upperBound
        var documented: [String: Int] = [:]
        for line in document[section...].split(separator: "\n").prefix(40) where line.hasPrefix("| 0x") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            documented[cells[2].trimmingCharacters(in: CharacterSet(charactersIn: "`"))] = Int(cells[0].dropFirst(2), radix: 16)
        }
        let h = PublishRingLayout.Header.self
        let expected = ["magic": h.magic, "ringLayoutVersion": h.layoutVersion, "dataSize": h.dataSize, "head": h.head,
                        "producerWaiting": h.producerWaiting, "tail": h.tail, "tailFutex": h.tailFutex,
                        "consumerIdle": h.consumerIdle, "consumedEntries": h.consumedEntries, "lastVersion": h.lastVersion,
                        "lastCrc64": h.lastCRC64, "lastLength": h.lastLength, "lastPublishedAt": h.lastPublishedAt,
                        "refusedEntries": h.refusedEntries, "lastRefusalCode": h.lastRefusalCode, "detachedCode": h.detachedCode,
                        "segmentCapacity": h.segmentCapacity]
        XCTAssertEqual(documented, expected)
        withUnsafeBytes(of: PublishRingLayout.magic.littleEndian) { XCTAssertEqual(Array($0), Array("SHMBRING".utf8)) }
    }

    /// Entries of every length cross the end of the data area (wrap markers) and each arrives
    /// intact and in order; the producer's "ring the doorbell" answer follows the idle flag.
    func testEntriesWrapAndArriveInOrder() throws {
        let ring = try makeRing()
        defer { ring.file.closeQuietly() }
        let (writer, reader, file) = try makeSegment(capacity: 4096)
        defer { file.closeQuietly() }
        var received: [[UInt8]] = []
        func drain() -> PublishRingConsumer.DrainOutcome {
            ring.consumer.markAwake()
            return ring.consumer.drain(maximumEntries: 1000) { payload in
                received.append(Array(payload))
                return .success(try! writer.publish(payload))
            }
        }
        XCTAssertEqual(ring.producer.maximumPayload, 4096 - 16)
        var sent: [[UInt8]] = []
        for length in [0, 1, 15, 16, 17, 63, 64, 1000, 3000, 4080, 2500, 7, 4000, 100] {
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ length) }
            let signal = try payload.withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 1_000_000_000) }
            XCTAssertTrue(signal, "the consumer is idle after each drain: the producer must ring")
            sent.append(payload)
            XCTAssertEqual(drain(), .idle)
        }
        XCTAssertEqual(received, sent)
        let results = ring.producer.results
        XCTAssertEqual(results.consumedEntries, UInt64(sent.count))
        XCTAssertEqual(results.lastVersion, UInt64(sent.count))
        XCTAssertEqual(results.lastCRC64, CRC64.checksum(sent.last!))
        XCTAssertEqual(try reader.read()?.bytes, sent.last)
        // While the consumer is busy (not idle), appends need no doorbell.
        ring.consumer.markAwake()
        XCTAssertFalse(try [UInt8]([1]).withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: nil) })
    }

    /// A full ring makes the producer wait, with a timeout; a payload that can never fit is
    /// refused at once; refusals by the consumer are counted with their code.
    func testFullRingWaitsAndRefusalsAreRecorded() throws {
        let ring = try makeRing()
        defer { ring.file.closeQuietly() }
        let big = [UInt8](repeating: 1, count: 3000)
        for _ in 0..<2 { _ = try big.withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 0) } }
        XCTAssertThrowsError(try big.withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 20_000_000) }) {
            XCTAssertEqual($0 as? PublishRingError, .timedOut)
        }
        XCTAssertThrowsError(try [UInt8](repeating: 0, count: 5000).withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 0) }) {
            XCTAssertEqual($0 as? PublishRingError, .payloadTooLarge(length: 5000, maximum: 4080))
        }
        // The consumer refuses both (say, a segment too small): counted, the ring moves on.
        XCTAssertEqual(ring.consumer.drain(maximumEntries: 10) { _ in .failure(RingRefusal(code: 7)) }, .idle)
        let results = ring.producer.results
        XCTAssertEqual(results.refusedEntries, 2)
        XCTAssertEqual(results.lastRefusalCode, 7)
        XCTAssertEqual(results.lastVersion, 0)
        XCTAssertNoThrow(try big.withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 0) })
    }

    /// Whatever the producer scribbles, the consumer reports a broken ring rather than reading
    /// outside it, and a detached ring makes the producer's waits fail with the reason.
    func testScribbledRingsAreReportedBrokenAndDetachmentWakesTheProducer() throws {
        let h = PublishRingLayout.Header.self
        for scribble in [(h.head, UInt64(1) << 40), (h.head, UInt64(8192 + 64))] {
            let ring = try makeRing()
            defer { ring.file.closeQuietly() }
            ring.consumerRegion.base.storeBytes(of: scribble.1, toByteOffset: scribble.0, as: UInt64.self)
            guard case .broken = ring.consumer.drain(maximumEntries: 10, publish: { _ in .failure(RingRefusal(code: 1)) }) else {
                return XCTFail("head \(scribble.1) was followed")
            }
        }
        // An entry whose length runs past head.
        let ring = try makeRing()
        defer { ring.file.closeQuietly() }
        _ = try [UInt8](repeating: 5, count: 10).withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 0) }
        (ring.consumerRegion.base + PublishRingLayout.headerSize).storeBytes(of: UInt32(5000), as: UInt32.self)
        guard case .broken = ring.consumer.drain(maximumEntries: 10, publish: { _ in .failure(RingRefusal(code: 1)) }) else {
            return XCTFail("an entry longer than what was appended was consumed")
        }
        // A producer waiting for space is woken by the detachment and told why.
        let full = [UInt8](repeating: 1, count: 4000)
        var appended = 0
        while (try? full.withUnsafeBytes({ try ring.producer.append($0, timeoutNanoseconds: 0) })) != nil { appended += 1 }
        XCTAssertEqual(appended, 2, "two 4000-byte entries fit beside the 10-byte one in 8 KiB")
        nonisolated(unsafe) let consumer = ring.consumer
        let detacher = Thread { usleep(50_000); consumer.detach(code: 13) }
        detacher.start()
        XCTAssertThrowsError(try full.withUnsafeBytes { try ring.producer.append($0, timeoutNanoseconds: 30_000_000_000) }) {
            XCTAssertEqual($0 as? PublishRingError, .detached(code: 13))
        }
    }

    func testInvalidHeadersAreRefusedWithTheReason() throws {
        let file = try MemoryFile.createScratch(name: "ring-test", sealedAgainstShrinking: true)
        defer { file.closeQuietly() }
        try file.setSize(PublishRingLayout.headerSize + 4096)
        let region = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + 4096, writable: true)
        XCTAssertThrowsError(try PublishRingConsumer(region: region)) { XCTAssertTrue("\($0)".contains("magic"), "\($0)") }
        _ = PublishRingProducer(formatting: region, dataSize: 4096)
        region.base.storeBytes(of: UInt64(8192), toByteOffset: PublishRingLayout.Header.dataSize, as: UInt64.self)
        XCTAssertThrowsError(try PublishRingConsumer(region: region)) { XCTAssertTrue("\($0)".contains("data size"), "\($0)") }
    }
}
