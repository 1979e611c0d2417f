/// The byte layout of a segment's shared memory, as specified in `docs/LAYOUT.md`.
///
/// All integers are little-endian. A segment is a 256-byte header followed by `slotCount` slots;
/// version `v` is stored in slot `v % slotCount`. After the slots comes each slot's table of block
/// checksums (entry `k`: the CRC-64 of its version's first `k + 1` blocks of ``checksumBlockSize``
/// bytes), which lets a reader verify a large version block by block as it consumes it. Every
/// offset here is named once, so the document
/// and the code cannot drift apart silently (the layout tests check them against each other).
public struct SegmentLayout: Sendable, Equatable {
    /// `"SHMBROKR"` as bytes, read as a little-endian `UInt64`.
    public static let magic: UInt64 = 0x524B_4F52_424D_4853
    /// Bumped on any incompatible change to this layout. Version 2 added the wait board: the
    /// writer skips the futex wake-up when no reader says it sleeps.
    public static let layoutVersion: UInt32 = 2
    /// Size of the segment header; the first slot starts here.
    public static let headerSize = 256
    /// Size of each slot's descriptor; the slot's data follows it.
    public static let slotHeaderSize = 64
    /// Slots and the data in them are aligned to cache lines.
    public static let alignment = 64
    /// Longest segment name, in UTF-8 bytes.
    public static let maximumNameLength = 64
    /// Fewest and most slots a segment may have.
    public static let slotCountRange: ClosedRange<Int> = 2...16

    /// Header field offsets.
    public enum Header {
        public static let magic = 0x00
        public static let layoutVersion = 0x08
        public static let headerSize = 0x0C
        public static let capacity = 0x10
        public static let slotCount = 0x18
        public static let flags = 0x1C
        public static let slotStride = 0x20
        public static let createdAt = 0x28
        /// `u32`: bytes per checksummed block (a power of two), when the `blockChecksums` flag is set.
        public static let checksumBlockSize = 0x30
        public static let name = 0x40
        public static let latestVersion = 0x80
        public static let futexWord = 0x88
    }

    /// Slot descriptor field offsets, relative to the slot's start.
    public enum Slot {
        public static let sequence = 0x00
        public static let length = 0x08
        public static let crc64 = 0x10
        public static let publishedAt = 0x18
        public static let data = 0x40
    }

    /// Bits of the header's `flags` word.
    public enum Flags {
        /// The daemon no longer publishes to this segment (it was removed from the config).
        public static let retired: UInt32 = 1
        /// The writer wakes futex waiters only while the wait board counts a sleeper: a reader
        /// must register there before it sleeps (see ``WaitBoard``).
        public static let sleeperBoard: UInt32 = 2
        /// A mirrored segment whose source has not been heard from within its bound (see
        /// `docs/MIRROR.md`): the last good version stays readable, but it may be old.
        public static let stale: UInt32 = 4
        /// The segment has block checksum tables after its slots, with blocks of the header's
        /// `checksumBlockSize` bytes. Set by every writer since it was introduced; a segment
        /// formatted by an older writer (kept through the fd store across an upgrade) lacks it.
        public static let blockChecksums: UInt32 = 8
    }

    /// The block size a writer formats new segments with: big enough that a block's table entry
    /// (one store, one comparison) is noise beside it, small enough that a block written a moment
    /// ago is still in the core's L1 cache when it is checksummed (64 KiB blocks measured 0.65×
    /// the no-checksum floor at 16 MiB, 16 KiB blocks 0.71×: `docs/PERFORMANCE.md`).
    public static let defaultChecksumBlockSize = 16 << 10
    /// The block sizes a reader accepts: powers of two in this range.
    public static let checksumBlockSizeRange: ClosedRange<Int> = 4096...(1 << 30)

    /// The wait board: a separate 4096-byte memfd, writable by readers, in which a reader counts
    /// itself while it sleeps on the segment's futex word, so that the writer makes no system
    /// call for a publish nobody sleeps on.
    public enum WaitBoard {
        /// Size of the board file.
        public static let size = 4096
        /// **Atomic** `u32`: readers sleeping (or about to sleep) on the segment's futex word.
        public static let sleepers = 0x00
    }

    /// Most bytes one version may hold.
    public let capacity: Int
    /// Number of slots the writer rotates through.
    public let slotCount: Int
    /// Bytes per checksummed block, or 0 for a segment without block checksum tables.
    public let checksumBlockSize: Int

    /// Describes a segment layout.
    /// - Parameters:
    ///   - capacity: payload bytes per version, at least 1.
    ///   - slotCount: number of rotating slots, within ``slotCountRange``.
    ///   - checksumBlockSize: bytes per block of the block checksum tables (a power of two within
    ///     ``checksumBlockSizeRange``), or 0 for none (the layout of writers before them).
    public init(capacity: Int, slotCount: Int, checksumBlockSize: Int = SegmentLayout.defaultChecksumBlockSize) {
        precondition(capacity >= 1 && SegmentLayout.slotCountRange.contains(slotCount))
        precondition(checksumBlockSize == 0 || (SegmentLayout.checksumBlockSizeRange.contains(checksumBlockSize)
                                                  && checksumBlockSize & (checksumBlockSize - 1) == 0))
        self.capacity = capacity
        self.slotCount = slotCount
        self.checksumBlockSize = checksumBlockSize
    }

    /// Whether each slot has a table of block checksums.
    public var hasBlockChecksums: Bool { checksumBlockSize != 0 }

    /// Blocks in a full slot: `ceil(capacity / checksumBlockSize)` (0 without tables).
    public var blocksPerSlot: Int { hasBlockChecksums ? (capacity + checksumBlockSize - 1) / checksumBlockSize : 0 }

    /// Bytes from one slot's checksum table to the next's: 8 per block, rounded up to 64.
    public var checksumTableStride: Int {
        (blocksPerSlot * 8 + SegmentLayout.alignment - 1) / SegmentLayout.alignment * SegmentLayout.alignment
    }

    /// Offset of slot 0's checksum table: right after the last slot.
    public var checksumTablesOffset: Int { SegmentLayout.headerSize + slotCount * slotStride }

    /// Offset of the checksum table of the slot that holds `version`.
    public func checksumTableOffset(forVersion version: UInt64) -> Int {
        checksumTablesOffset + Int(version % UInt64(slotCount)) * checksumTableStride
    }

    /// Bytes from one slot's start to the next's.
    public var slotStride: Int {
        SegmentLayout.slotHeaderSize + (capacity + SegmentLayout.alignment - 1) / SegmentLayout.alignment * SegmentLayout.alignment
    }

    /// The size of the whole segment file: header, slots, checksum tables.
    public var totalSize: Int { checksumTablesOffset + slotCount * checksumTableStride }

    /// Offset of the slot that holds `version`.
    public func slotOffset(forVersion version: UInt64) -> Int {
        SegmentLayout.headerSize + Int(version % UInt64(slotCount)) * slotStride
    }
}
