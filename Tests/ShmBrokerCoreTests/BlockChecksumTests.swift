import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage
import XCTest

/// Block checksums: the writer's one-pass publishes (in pieces, appended, copied), the table it
/// leaves beside each slot, and the reader that verifies block by block as it consumes.
final class BlockChecksumTests: XCTestCase {
    struct Mapped {
        let file: FileDescriptor
        let writer: SegmentWriter
        let reader: SegmentReader
    }

    func makeSegment(capacity: Int, slots: Int = 3, blockSize: Int = SegmentLayout.defaultChecksumBlockSize) throws -> Mapped {
        let layout = SegmentLayout(capacity: capacity, slotCount: slots, checksumBlockSize: blockSize)
        let file = try MemoryFile.create(name: "blocks", size: layout.totalSize)
        let writer = SegmentWriter(formatting: try MappedRegion(mapping: file, length: layout.totalSize, writable: true),
                                   layout: layout, name: "blocks")
        let readOnly = try MemoryFile.readOnlyDuplicate(of: file)
        defer { readOnly.closeQuietly() }
        let reader = try SegmentReader(region: try MappedRegion(mapping: readOnly, length: try readOnly.fileSize(), writable: false))
        return Mapped(file: file, writer: writer, reader: reader)
    }

    func payload(_ length: Int, seed: UInt64) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<length).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    /// The table entry of block `index` of `version`, read from the mapping as a reader would.
    func tableEntry(_ segment: Mapped, version: UInt64, block index: Int) -> UInt64 {
        let offset = segment.writer.layout.checksumTableOffset(forVersion: version) + index * 8
        return UInt64(littleEndian: segment.writer.region.base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    func testEveryPublishPathWritesTheTableAndTheWholeChecksum() throws {
        let blockSize = 4096
        let segment = try makeSegment(capacity: 5 * blockSize + 100, slots: 4, blockSize: blockSize)
        defer { segment.file.closeQuietly() }
        for (version, length) in [(1, 5 * blockSize + 100), (2, 3 * blockSize), (3, 17), (4, 0), (5, 2 * blockSize + 1)] {
            let bytes = payload(length, seed: UInt64(version))
            let receipt: PublishReceipt
            switch version % 4 {
            case 1:
                receipt = try bytes.withUnsafeBytes { try segment.writer.publish($0, source: version == 1 ? .local : .writtenByAnotherCore) }
            case 2:
                var pieces: [Int] = []
                receipt = try segment.writer.publish(length: length, fillingBlocks: { (block: UnsafeMutableRawBufferPointer, offset: Int) throws(CancellationError) in
                    pieces.append(block.count)
                    bytes.withUnsafeBytes { block.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + block.count])) }
                })
                XCTAssertEqual(pieces, [blockSize, blockSize, blockSize], "the fill is handed whole blocks, in order")
            case 3:
                // Appended in odd pieces that straddle block boundaries.
                var reservation = try segment.writer.reserve(length: length)
                bytes.withUnsafeBytes { all in
                    var offset = 0
                    while offset < length {
                        let piece = min(length - offset, 1000 + offset % 3)
                        reservation.append(UnsafeRawBufferPointer(rebasing: all[offset..<offset + piece]))
                        offset += piece
                    }
                }
                XCTAssertEqual(reservation.written, length)
                receipt = segment.writer.commit(reservation)
            default:
                // Written in place, marked written part of the way; the commit checksums the rest.
                var reservation = try segment.writer.reserve(length: length)
                bytes.withUnsafeBytes { reservation.buffer.copyMemory(from: $0) }
                reservation.markWritten(through: length / 2)
                receipt = segment.writer.commit(reservation)
            }
            XCTAssertEqual(receipt.version, UInt64(version))
            XCTAssertEqual(receipt.crc64, CRC64.checksum(bytes), "version \(version): the CRC of the whole")
            bytes.withUnsafeBytes { all in
                for block in 0..<(length + blockSize - 1) / blockSize {
                    // Entry k: the CRC of everything up to the end of block k.
                    let range = 0..<min(length, (block + 1) * blockSize)
                    XCTAssertEqual(tableEntry(segment, version: UInt64(version), block: block),
                                   CRC64.checksum(UnsafeRawBufferPointer(rebasing: all[range])), "version \(version) block \(block)")
                }
            }
            XCTAssertEqual(try segment.reader.read()?.bytes, bytes)
        }
    }

    func testASingleBlockVersionHasItsCRCAsItsOnlyEntry() throws {
        let segment = try makeSegment(capacity: 8192, blockSize: 4096)
        defer { segment.file.closeQuietly() }
        for (index, length) in [100, 4096].enumerated() {
            let bytes = payload(length, seed: UInt64(20 + index))
            let copied = try bytes.withUnsafeBytes { try segment.writer.publish($0, source: .local) }
            XCTAssertEqual(tableEntry(segment, version: copied.version, block: 0), CRC64.checksum(bytes), "copied, \(length) bytes")
            let reservation = try segment.writer.reserve(length: length)
            bytes.withUnsafeBytes { reservation.buffer.copyMemory(from: $0) }
            let filled = segment.writer.commit(reservation)
            XCTAssertEqual(filled.crc64, CRC64.checksum(bytes))
            XCTAssertEqual(tableEntry(segment, version: filled.version, block: 0), filled.crc64, "filled in place, \(length) bytes")
            var blocks = 0
            try segment.reader.readBlocks { _ in blocks += 1 }
            XCTAssertEqual(blocks, 1)
        }
    }

    func testBlockReadHandsOnVerifiedBlocksInOrder() throws {
        let blockSize = 4096
        let segment = try makeSegment(capacity: 10 * blockSize, blockSize: blockSize)
        defer { segment.file.closeQuietly() }
        XCTAssertNil(try segment.reader.readBlocks { _ in XCTFail("nothing was published") })
        let bytes = payload(7 * blockSize + 5, seed: 9)
        let receipt = try segment.writer.publish(bytes)
        var consumed: [UInt8] = [], offsets: [Int] = []
        let read = try XCTUnwrap(try segment.reader.readBlocks { block in
            XCTAssertEqual(block.version, 1)
            offsets.append(block.offset)
            consumed += block.bytes
        })
        XCTAssertEqual(consumed, bytes)
        XCTAssertEqual(offsets, (0..<8).map { $0 * blockSize })
        XCTAssertEqual(read.crc64, receipt.crc64)
        XCTAssertEqual(read.length, bytes.count)

        try segment.writer.publish([UInt8]())
        var calls = 0
        XCTAssertEqual(try segment.reader.readBlocks { _ in calls += 1 }?.version, 2)
        XCTAssertEqual(calls, 0, "an empty version has no blocks")
    }

    func testACorruptBlockIsReportedBeforeItIsHandedOn() throws {
        let blockSize = 4096
        let segment = try makeSegment(capacity: 8 * blockSize, blockSize: blockSize)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(payload(8 * blockSize, seed: 3))
        let data = segment.writer.region.base + segment.writer.layout.slotOffset(forVersion: 1) + SegmentLayout.Slot.data
        (data + 5 * blockSize + 17).storeBytes(of: ~(data + 5 * blockSize + 17).load(as: UInt8.self), as: UInt8.self)
        var handed: [Int] = []
        XCTAssertThrowsError(try segment.reader.readBlocks { handed.append($0.offset / blockSize) }) { error in
            guard case .blockChecksumMismatch(let version, let block, _, _)? = error as? SegmentError else { return XCTFail("\(error)") }
            XCTAssertEqual(version, 1)
            XCTAssertEqual(block, 5)
        }
        XCTAssertEqual(handed, [0, 1, 2, 3, 4], "the corrupt block and those after it never reach the consumer")

        // A last entry that is not the version's CRC (a broken writer) fails at the end.
        try segment.writer.publish(payload(blockSize, seed: 4))
        let crcField = segment.writer.region.base + segment.writer.layout.slotOffset(forVersion: 2) + SegmentLayout.Slot.crc64
        crcField.storeBytes(of: crcField.load(as: UInt64.self) ^ 1, as: UInt64.self)
        XCTAssertThrowsError(try segment.reader.readBlocks { _ in }) { error in
            guard case .checksumMismatch(version: 2, _, _)? = error as? SegmentError else { return XCTFail("\(error)") }
        }
    }

    func testABlockReadOvertakenByTheWriterStartsOverOnTheNewerVersion() throws {
        let blockSize = 4096
        let segment = try makeSegment(capacity: 4 * blockSize, slots: 2, blockSize: blockSize)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(payload(4 * blockSize, seed: 1))
        let newest = payload(4 * blockSize, seed: 3)
        var published = false, versions: [UInt64] = [], consumed: [UInt8] = []
        let read = try XCTUnwrap(try segment.reader.readBlocks { block in
            if block.offset == 0 { consumed = [] }
            versions.append(block.version)
            consumed += block.bytes
            if block.offset == blockSize && !published {
                // Two publishes reuse the slot being read (two slots): the read must start over.
                published = true
                try segment.writer.publish(payload(4 * blockSize, seed: 2))
                try segment.writer.publish(newest)
            }
        })
        XCTAssertEqual(read.version, 3)
        XCTAssertEqual(consumed, newest)
        XCTAssertEqual(versions, [1, 1, 3, 3, 3, 3])
    }

    func testASegmentWithoutTablesIsStillReadBlockByBlockAndAdopted() throws {
        let segment = try makeSegment(capacity: 200_000, blockSize: 0)
        defer { segment.file.closeQuietly() }
        XCTAssertFalse(segment.reader.layout.hasBlockChecksums)
        let bytes = payload(150_000, seed: 5)
        try segment.writer.publish(bytes)
        var consumed: [UInt8] = []
        try segment.reader.readBlocks { consumed += $0.bytes }
        XCTAssertEqual(consumed, bytes)
        let adopted = try SegmentWriter(adopting: try MappedRegion(mapping: segment.file, length: segment.writer.layout.totalSize, writable: true))
        XCTAssertFalse(adopted.layout.hasBlockChecksums, "an older writer's segment keeps its layout")
        XCTAssertEqual(try adopted.publish(bytes).crc64, CRC64.checksum(bytes))
    }

    func testAdoptionChecksTheTable() throws {
        let blockSize = 4096
        let segment = try makeSegment(capacity: 4 * blockSize, blockSize: blockSize)
        defer { segment.file.closeQuietly() }
        try segment.writer.publish(payload(3 * blockSize, seed: 8))
        let size = segment.writer.layout.totalSize
        XCTAssertNoThrow(try SegmentWriter(adopting: try MappedRegion(mapping: segment.file, length: size, writable: true)))
        let entry = segment.writer.region.base + segment.writer.layout.checksumTableOffset(forVersion: 1) + 8
        entry.storeBytes(of: entry.load(as: UInt64.self) ^ 0x100, as: UInt64.self)
        XCTAssertThrowsError(try SegmentWriter(adopting: try MappedRegion(mapping: segment.file, length: size, writable: true))) { error in
            guard case .inconsistentHeader(let detail)? = error as? SegmentError else { return XCTFail("\(error)") }
            XCTAssertTrue(detail.contains("block 1"), detail)
        }
    }

    func testAHeaderWithABadBlockSizeIsRefused() throws {
        let segment = try makeSegment(capacity: 1000)
        defer { segment.file.closeQuietly() }
        let field = segment.writer.region.base + SegmentLayout.Header.checksumBlockSize
        for bad: UInt32 in [0, 4095, 5000, 1 << 31] {
            field.storeBytes(of: bad.littleEndian, as: UInt32.self)
            XCTAssertThrowsError(try SegmentReader(region: segment.writer.region), "block size \(bad)") { error in
                guard case .inconsistentHeader? = error as? SegmentError else { return XCTFail("\(error)") }
            }
        }
    }
}
