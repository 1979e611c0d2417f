import Atomics
// The one receipt type is the wire's: what a writer returns is what PUBLISHED and VERSION carry.
@_exported import struct ShmBrokerProtocol.PublishReceipt
import ShmBrokerPlatform

/// Typed access to the fields of a mapped segment; shared by ``SegmentWriter`` and ``SegmentReader``.
///
/// Fields that the writer changes while readers look (`latestVersion`, `futexWord`, each slot's
/// `sequence`) are accessed atomically; the rest are plain little-endian loads and stores.
@usableFromInline
struct SegmentMemory: @unchecked Sendable {
    let region: MappedRegion
    let layout: SegmentLayout
    /// Slot 0's checksum table (nil without tables) and the distance from one table to the next,
    /// worked out once: every publish looks its version's table up.
    private let tables: UnsafeMutableRawPointer?
    private let tableStride: Int

    init(region: MappedRegion, layout: SegmentLayout) {
        self.region = region
        self.layout = layout
        tables = layout.hasBlockChecksums ? region.base + layout.checksumTablesOffset : nil
        tableStride = layout.checksumTableStride
    }

    var base: UnsafeMutableRawPointer { region.base }

    func load<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    func store<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }

    func atomic64(at offset: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (base + offset).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
    }

    func atomic32(at offset: Int) -> UnsafeAtomic<UInt32> {
        UnsafeAtomic(at: (base + offset).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }

    var latestVersion: UnsafeAtomic<UInt64> { atomic64(at: SegmentLayout.Header.latestVersion) }
    var futexWord: UnsafeAtomic<UInt32> { atomic32(at: SegmentLayout.Header.futexWord) }
    var futexAddress: UnsafePointer<UInt32> {
        UnsafePointer((base + SegmentLayout.Header.futexWord).assumingMemoryBound(to: UInt32.self))
    }

    var flags: UInt32 { atomic32(at: SegmentLayout.Header.flags).load(ordering: .acquiring) }

    func slotSequence(_ slot: Int) -> UnsafeAtomic<UInt64> { atomic64(at: slot + SegmentLayout.Slot.sequence) }

    func slotData(_ slot: Int) -> UnsafeMutableRawPointer { base + slot + SegmentLayout.Slot.data }

    /// The offset of the slot that holds `version`, and that slot's checksum table (nil for a
    /// segment without tables), from one division.
    func slotAndTable(forVersion version: UInt64) -> (slot: Int, table: UnsafeMutableRawPointer?) {
        let index = Int(version % UInt64(layout.slotCount))
        return (SegmentLayout.headerSize + index * layout.slotStride, tables.map { $0 + index * tableStride })
    }

    /// The checksum table of the slot that holds `version`, or nil for a segment without tables.
    func checksumTable(forVersion version: UInt64) -> UnsafeMutableRawPointer? {
        slotAndTable(forVersion: version).table
    }

    /// The segment name stored in the header.
    var name: String {
        let bytes = UnsafeRawBufferPointer(start: base + SegmentLayout.Header.name, count: SegmentLayout.maximumNameLength)
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// Reads and checks the header of a mapping made by someone else (a reader, or a restarted daemon).
    static func validate(_ region: MappedRegion) throws(SegmentError) -> SegmentLayout {
        guard region.length >= SegmentLayout.headerSize else {
            throw .inconsistentHeader("mapping of \(region.length) bytes is smaller than the \(SegmentLayout.headerSize)-byte header")
        }
        func field<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T {
            T(littleEndian: region.base.loadUnaligned(fromByteOffset: offset, as: T.self))
        }
        let magic = field(UInt64.self, SegmentLayout.Header.magic)
        guard magic == SegmentLayout.magic else { throw .badMagic(found: magic) }
        let version = field(UInt32.self, SegmentLayout.Header.layoutVersion)
        guard version == SegmentLayout.layoutVersion else { throw .unsupportedLayoutVersion(version) }
        let headerSize = Int(field(UInt32.self, SegmentLayout.Header.headerSize))
        guard headerSize == SegmentLayout.headerSize else { throw .inconsistentHeader("header size \(headerSize)") }
        let capacity = field(UInt64.self, SegmentLayout.Header.capacity)
        let slots = Int(field(UInt32.self, SegmentLayout.Header.slotCount))
        guard capacity >= 1, capacity < UInt64(Int.max / 32), SegmentLayout.slotCountRange.contains(slots) else {
            throw .inconsistentHeader("capacity \(capacity) with \(slots) slots")
        }
        // Block checksum tables: only when the flag says so (an older writer left the field 0).
        var blockSize = 0
        if field(UInt32.self, SegmentLayout.Header.flags) & SegmentLayout.Flags.blockChecksums != 0 {
            blockSize = Int(field(UInt32.self, SegmentLayout.Header.checksumBlockSize))
            guard SegmentLayout.checksumBlockSizeRange.contains(blockSize), blockSize & (blockSize - 1) == 0 else {
                throw .inconsistentHeader("checksum block size \(blockSize) is not a power of two from 4096 to 2^30")
            }
        }
        let layout = SegmentLayout(capacity: Int(capacity), slotCount: slots, checksumBlockSize: blockSize)
        let stride = field(UInt64.self, SegmentLayout.Header.slotStride)
        guard stride == UInt64(layout.slotStride) else {
            throw .inconsistentHeader("slot stride \(stride), expected \(layout.slotStride)")
        }
        guard layout.totalSize <= region.length else {
            throw .inconsistentHeader("layout needs \(layout.totalSize) bytes, mapping has \(region.length)")
        }
        return layout
    }
}

/// One verified version of a segment's content, as a reader saw it.
public struct SegmentSnapshot: Sendable, Equatable {
    /// The version number, counting from 1.
    public var version: UInt64
    /// The content.
    public var bytes: [UInt8]
    /// CRC-64/XZ of `bytes`, verified.
    public var crc64: UInt64
    /// When the daemon published it, in nanoseconds since the Unix epoch.
    public var publishedAtNanoseconds: UInt64

    public init(version: UInt64, bytes: [UInt8], crc64: UInt64, publishedAtNanoseconds: UInt64) {
        self.version = version
        self.bytes = bytes
        self.crc64 = crc64
        self.publishedAtNanoseconds = publishedAtNanoseconds
    }
}


