import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage
import XCTest

/// The publish/read protocol over a real memfd mapped twice: writable (the daemon's view) and
/// read-only through a read-only reopening (a reader's view).
final class SegmentTests: XCTestCase {
    struct Mapped {
        let file: FileDescriptor
        let writer: SegmentWriter
        let reader: SegmentReader
    }

    func makeSegment(capacity: Int, slots: Int = 3) throws -> Mapped {
        let layout = SegmentLayout(capacity: capacity, slotCount: slots)
        let file = try MemoryFile.create(name: "test", size: layout.totalSize)
        let writer = SegmentWriter(formatting: try MappedRegion(mapping: file, length: layout.totalSize, writable: true),
                                   layout: layout, name: "unit")
        let readOnly = try MemoryFile.readOnlyDuplicate(of: file)
        defer { readOnly.closeQuietly() }
        let reader = try SegmentReader(region: try MappedRegion(mapping: readOnly, length: try readOnly.fileSize(), writable: false))
        return Mapped(file: file, writer: writer, reader: reader)
    }

    func testLayoutMatchesTheDocumentedOffsets() {
        XCTAssertEqual(SegmentLayout.magic, 0x524B_4F52_424D_4853)
        withUnsafeBytes(of: SegmentLayout.magic.littleEndian) { XCTAssertEqual(Array($0), Array("SHMBROKR".utf8)) }
        let layout = SegmentLayout(capacity: 100, slotCount: 3)
        XCTAssertEqual(layout.slotStride, 64 + 128)
        XCTAssertEqual(layout.checksumBlockSize, 16384)
        XCTAssertEqual(layout.checksumTablesOffset, 256 + 3 * 192, "the checksum tables follow the slots")
        XCTAssertEqual(layout.checksumTableStride, 64, "one 8-byte entry, rounded up to a cache line")
        XCTAssertEqual(layout.totalSize, 256 + 3 * 192 + 3 * 64)
        XCTAssertEqual(layout.checksumTableOffset(forVersion: 4), 256 + 3 * 192 + 64)
        XCTAssertEqual(SegmentLayout(capacity: 100, slotCount: 3, checksumBlockSize: 0).totalSize, 256 + 3 * 192,
                       "a layout without tables is the older one")
        XCTAssertEqual(SegmentLayout(capacity: (1 << 20) + 1, slotCount: 2).checksumTableStride, 65 * 8 + 56)
        // The segment of docs/PROTOCOL.md's OPENED and STATUS examples (DocumentedExamplesTests).
        XCTAssertEqual(SegmentLayout(capacity: 65536, slotCount: 3).totalSize, 197_248)
        XCTAssertEqual(layout.slotOffset(forVersion: 1), 256 + 192)
        XCTAssertEqual(layout.slotOffset(forVersion: 3), 256)
        XCTAssertEqual(SegmentLayout.Header.latestVersion % 8, 0)
        XCTAssertEqual(SegmentLayout.Header.futexWord % 4, 0)
    }

    func testNeverPublishedIsDistinctFromEmpty() throws {
        let segment = try makeSegment(capacity: 16)
        defer { segment.file.closeQuietly() }
        XCTAssertEqual(try segment.reader.readOnce(), .neverPublished)
        XCTAssertNil(try segment.reader.read())
        try segment.writer.publish([UInt8]())
        let empty = try XCTUnwrap(try segment.reader.read())
        XCTAssertEqual(empty.version, 1)
        XCTAssertEqual(empty.bytes, [])
        XCTAssertEqual(empty.crc64, 0)
    }

    func testVersionsCycleThroughSlotsAndReadersSeeTheLatest() throws {
        let segment = try makeSegment(capacity: 64, slots: 2)
        defer { segment.file.closeQuietly() }
        for version in 1...10 {
            let payload = Array("version \(version)".utf8)
            let receipt = try segment.writer.publish(payload)
            XCTAssertEqual(receipt.version, UInt64(version))
            XCTAssertEqual(receipt.crc64, CRC64.checksum(payload))
            let snapshot = try XCTUnwrap(try segment.reader.read())
            XCTAssertEqual(snapshot.version, UInt64(version))
            XCTAssertEqual(snapshot.bytes, payload)
            XCTAssertEqual(snapshot.publishedAtNanoseconds, receipt.publishedAtNanoseconds)
        }
        XCTAssertEqual(segment.reader.name, "unit")
    }

    func testZeroCopyBorrowSeesTheLatestVersionAndNoticesReuse() throws {
        let segment = try makeSegment(capacity: 64, slots: 2)
        defer { segment.file.closeQuietly() }
        XCTAssertNil(try segment.reader.withLatestVersion { $0.version })
        try segment.writer.publish(Array("in place".utf8))
        let seen = try segment.reader.withLatestVersion { borrowed -> (UInt64, [UInt8]) in
            (borrowed.version, Array(borrowed.bytes))
        }
        XCTAssertEqual(seen?.0, 1)
        XCTAssertEqual(seen?.1, Array("in place".utf8))

        // A body during which the writer laps the slot is discarded and rerun on the newer version.
        var runs = 0
        let result = try segment.reader.withLatestVersion { borrowed -> UInt64 in
            runs += 1
            if runs == 1 {
                _ = try? segment.writer.publish(Array("two".utf8))
                _ = try? segment.writer.publish(Array("three".utf8))  // reuses version 1's slot
                XCTAssertFalse(borrowed.isStillCurrent)
            }
            return borrowed.version
        }
        XCTAssertEqual(runs, 2)
        XCTAssertEqual(result, 3)
    }

    func testReadIntoACallersBufferVerifiesAndRefusesAShortBuffer() throws {
        let segment = try makeSegment(capacity: 256)
        defer { segment.file.closeQuietly() }
        var buffer = [UInt8](repeating: 0, count: 256)
        XCTAssertEqual(try buffer.withUnsafeMutableBytes { try segment.reader.readOnce(into: $0) }, .neverPublished)
        let payload = (0..<200).map { UInt8($0) }
        let receipt = try segment.writer.publish(payload)
        guard case .copied(let info) = try buffer.withUnsafeMutableBytes({ try segment.reader.readOnce(into: $0) }) else {
            return XCTFail("no copy")
        }
        XCTAssertEqual(info.version, 1)
        XCTAssertEqual(info.length, 200)
        XCTAssertEqual(info.crc64, receipt.crc64)
        XCTAssertEqual(Array(buffer[..<200]), payload)
        var small = [UInt8](repeating: 0, count: 100)
        XCTAssertThrowsError(try small.withUnsafeMutableBytes { try segment.reader.readOnce(into: $0) }) { error in
            XCTAssertEqual(error as? SegmentError, .payloadTooLarge(length: 200, capacity: 100))
        }
    }

    /// Both copy strategies (two passes for mid sizes from another core's memory, one fused pass
    /// for a local buffer) store the same bytes with the checksum of what was stored, at sizes
    /// on both sides of the two-pass range.
    func testEitherPublishSourceStoresTheBytesWithTheirChecksum() throws {
        let capacity = 300 << 10
        let segment = try makeSegment(capacity: capacity)
        defer { segment.file.closeQuietly() }
        var buffer = [UInt8](repeating: 0, count: capacity)
        for size in [100, 8191, 8192, 64 << 10, (256 << 10) + 1, capacity] {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ size) }
            for source in [SegmentWriter.Source.writtenByAnotherCore, .local] {
                let receipt = try payload.withUnsafeBytes { try segment.writer.publish($0, source: source) }
                XCTAssertEqual(receipt.crc64, CRC64.checksum(payload), "size \(size), \(source)")
                guard case .copied(let info) = try buffer.withUnsafeMutableBytes({ try segment.reader.readOnce(into: $0) }) else {
                    return XCTFail("no verified copy at size \(size), \(source)")
                }
                XCTAssertEqual(info.version, receipt.version)
                XCTAssertEqual(info.crc64, receipt.crc64)
                XCTAssertTrue(buffer[..<size].elementsEqual(payload), "size \(size), \(source)")
            }
        }
    }

    func testOversizePayloadIsRefusedAndNothingChanges() throws {
        let segment = try makeSegment(capacity: 8)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish([1, 2, 3])
        XCTAssertThrowsError(try segment.writer.publish([UInt8](repeating: 9, count: 9))) { error in
            XCTAssertEqual(error as? SegmentError, .payloadTooLarge(length: 9, capacity: 8))
            XCTAssertTrue("\(error)".contains("capacity of 8 bytes"))
        }
        XCTAssertEqual(try segment.reader.read()?.bytes, [1, 2, 3])
        XCTAssertEqual(segment.reader.latestVersion, 1)
    }

    func testAFailedFillLeavesThePreviousVersionReadable() throws {
        struct Interrupted: Error {}
        let segment = try makeSegment(capacity: 32, slots: 2)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(Array("good".utf8))
        XCTAssertThrowsError(try segment.writer.publish(length: 10) { (buffer: UnsafeMutableRawBufferPointer) throws(Interrupted) in
            buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
            throw Interrupted()
        })
        XCTAssertEqual(try segment.reader.read()?.bytes, Array("good".utf8))
        XCTAssertEqual(try segment.writer.publish(Array("next".utf8)).version, 2)
    }

    func testAWriteInProgressDoesNotDisturbReadersOfTheLatestVersion() throws {
        let segment = try makeSegment(capacity: 32, slots: 2)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(Array("one".utf8))
        // The writer starts version 3 in version 1's slot while a reader still looks at version 1:
        // latestVersion says 1, but the slot's sequence no longer does.
        try segment.writer.publish(Array("two".utf8))
        var observed: SegmentReader.Attempt?
        _ = try? segment.writer.publish(length: 5) { (buffer: UnsafeMutableRawBufferPointer) throws(CancellationError) in
            observed = try? segment.reader.readOnce()
            throw CancellationError()
        }
        guard case .snapshot(let snapshot)? = observed else { return XCTFail("no snapshot during the write: \(String(describing: observed))") }
        XCTAssertEqual(snapshot.version, 2, "a write into another slot does not disturb the latest version")
    }

    func testCorruptionIsReportedNotReturned() throws {
        let segment = try makeSegment(capacity: 32)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(Array("intact".utf8))
        let data = segment.writer.region.base + segment.writer.layout.slotOffset(forVersion: 1) + SegmentLayout.Slot.data
        data.storeBytes(of: UInt8(ascii: "X"), as: UInt8.self)
        XCTAssertThrowsError(try segment.reader.read()) { error in
            guard case .checksumMismatch(let version, _, _)? = error as? SegmentError else { return XCTFail("\(error)") }
            XCTAssertEqual(version, 1)
        }
    }

    func testAdoptionContinuesVersionsAndRejectsCorruptContent() throws {
        let segment = try makeSegment(capacity: 64)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(Array("before restart".utf8))
        let size = segment.writer.layout.totalSize
        let adopted = try SegmentWriter(adopting: try MappedRegion(mapping: segment.file, length: size, writable: true))
        XCTAssertEqual(adopted.latestVersion, 1)
        XCTAssertEqual(try adopted.publish(Array("after".utf8)).version, 2)
        XCTAssertEqual(try segment.reader.read()?.bytes, Array("after".utf8), "an existing reader mapping sees the adopter's versions")

        let data = segment.writer.region.base + segment.writer.layout.slotOffset(forVersion: 2) + SegmentLayout.Slot.data
        data.storeBytes(of: UInt8(ascii: "Z"), as: UInt8.self)
        XCTAssertThrowsError(try SegmentWriter(adopting: try MappedRegion(mapping: segment.file, length: size, writable: true)))

        let garbage = try MemoryFile.create(name: "garbage", size: 4096)
        defer { garbage.closeQuietly() }
        XCTAssertThrowsError(try SegmentWriter(adopting: try MappedRegion(mapping: garbage, length: 4096, writable: true))) { error in
            XCTAssertEqual(error as? SegmentError, .badMagic(found: 0))
        }
    }

    func testRetireWakesWaiters() throws {
        let segment = try makeSegment(capacity: 8)
        defer { segment.file.closeQuietly() }
        XCTAssertFalse(segment.reader.isRetired)
        XCTAssertEqual(segment.reader.waitForVersion(after: 0, timeoutNanoseconds: 1_000_000), 0, "times out with nothing new")
        segment.writer.retire()
        XCTAssertTrue(segment.reader.isRetired)
        XCTAssertEqual(segment.reader.waitForVersion(after: 0, timeoutNanoseconds: nil), 0, "returns at once when retired")
    }

    func testMemfdIsSealedAgainstResizing() throws {
        let file = try MemoryFile.create(name: "sealed", size: 4096)
        defer { file.closeQuietly() }
        let seals = try MemoryFile.seals(of: file)
        XCTAssertTrue(seals.contains([.shrink, .grow, .seal]))
        XCTAssertFalse(seals.contains(.futureWrite), "FUTURE_WRITE would stop a restarted daemon from mapping it writable")
    }
}
