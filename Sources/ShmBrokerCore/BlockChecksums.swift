import CShmBrokerCRC

extension CRC64 {
    /// Feeds `source` into the checksum while copying it to `destination`, in one pass over memory
    /// where the CPU allows.
    ///
    /// - Parameters:
    ///   - source: the bytes to copy and check.
    ///   - destination: at least `source.count` writable bytes, not overlapping `source`.
    public mutating func copyAndUpdate(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        guard let base = source.baseAddress, source.count > 0 else { return }
        if CRC64.activePath >= .clmul128 && source.count >= CRC64.foldingThreshold && CRC64.isHardwareAvailable {
            state = shmb_crc64_copy_path(CRC64.activePath.rawValue, state, destination, base, source.count)
        } else {
            destination.copyMemory(from: base, byteCount: source.count)
            updatePortably(UnsafeRawBufferPointer(start: destination, count: source.count))
        }
    }
}

extension SegmentLayout {
    /// The block size versions are checksummed and read in: the layout's, or for a segment
    /// without tables the default one (a writer still checksums in cache-sized pieces; it just
    /// has nowhere to store them).
    var checksummingBlockSize: Int { hasBlockChecksums ? checksumBlockSize : SegmentLayout.defaultChecksumBlockSize }
}

/// Checksums a version block by block as it is written, each block while it is still in cache:
/// one running CRC over the whole version, whose value at the end of every block goes to the
/// slot's checksum table (``SegmentLayout`` "block checksums": entry `k` is the CRC of the first
/// `k + 1` blocks), so a large version costs one pass over memory, not a write pass and then a
/// read pass, and the table costs one store per block.
///
/// Bytes are fed strictly in order, from offset 0, either in place (``absorb(_:)``, after the
/// caller wrote them) or while copying (``copy(from:to:)``).
struct BlockChecksummer {
    private let blockMask: Int
    private let blockShift: Int
    /// The slot's table (one entry per block), or nil for a segment formatted without one.
    private let table: UnsafeMutableRawPointer?
    /// Bytes fed so far.
    private(set) var covered = 0
    /// The running CRC of everything fed.
    private var crc = CRC64()

    /// - Parameters:
    ///   - blockSize: the block size (a power of two).
    ///   - table: where the CRC of blocks `0...k` goes (at `8k`), or nil to keep only the whole's.
    init(blockSize: Int, table: UnsafeMutableRawPointer?) {
        blockMask = blockSize - 1
        blockShift = blockSize.trailingZeroBitCount
        self.table = table
    }

    /// How many bytes may be fed before the current block is complete.
    private var roomInBlock: Int { blockMask + 1 - (covered & blockMask) }

    /// Feeds bytes the caller has just written (at offset ``covered``), in place.
    mutating func absorb(_ bytes: UnsafeRawBufferPointer) {
        inPieces(bytes.count) { checksummer, offset, take in
            checksummer.crc.update(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + take]))
        }
    }

    /// Copies `source` to `destination` (the slot at offset ``covered``), checksumming as it goes.
    mutating func copy(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        inPieces(source.count) { checksummer, offset, take in
            checksummer.crc.copyAndUpdate(from: UnsafeRawBufferPointer(rebasing: source[offset..<offset + take]), to: destination + offset)
        }
    }

    /// Copies `source` to `destination`, then checksums the copy, a block at a time: for a source
    /// another core just wrote, whose lines a fused pass would wait on (see
    /// ``CRC64/copyThenChecksum(from:to:)``); each block is still in cache when it is read back.
    mutating func copyThenAbsorb(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        inPieces(source.count) { checksummer, offset, take in
            (destination + offset).copyMemory(from: source.baseAddress! + offset, byteCount: take)
            checksummer.crc.update(UnsafeRawBufferPointer(start: destination + offset, count: take))
        }
    }

    /// Feeds `count` bytes in pieces that end at block boundaries: `feed` updates the CRC with
    /// the piece at `offset` (relative to the call) of `take` bytes, then its block's entry is
    /// recorded if the piece completed it.
    @inline(__always)
    private mutating func inPieces(_ count: Int, _ feed: (inout BlockChecksummer, _ offset: Int, _ take: Int) -> Void) {
        var offset = 0
        while offset < count {
            let take = min(count - offset, roomInBlock)
            feed(&self, offset, take)
            advance(by: take)
            offset += take
        }
    }

    private mutating func advance(by count: Int) {
        covered += count
        if covered & blockMask == 0 { record() }
    }

    /// Stores the running CRC as the entry of the block that holds the last byte fed.
    private mutating func record() {
        table?.storeBytes(of: crc.value.littleEndian, toByteOffset: ((covered - 1) >> blockShift) * 8, as: UInt64.self)
    }

    /// The CRC-64/XZ of everything fed, recording a last partial block's entry.
    mutating func finish() -> UInt64 {
        if covered & blockMask != 0 { record() }
        return crc.value
    }
}
