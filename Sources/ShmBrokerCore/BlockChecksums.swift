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

    /// The CRC-64/XZ of `a ‖ b`, from the CRC of `a`, the CRC of `b` and the length of `b`: how
    /// checksums of pieces computed while each piece was hot in cache become the checksum of the
    /// whole, without another pass over it (the method of zlib's `crc32_combine`, for this
    /// polynomial).
    ///
    /// - Parameters:
    ///   - first: the CRC-64/XZ of the leading bytes.
    ///   - second: the CRC-64/XZ of the bytes that follow them.
    ///   - secondLength: how many bytes `second` covers.
    public static func combine(_ first: UInt64, _ second: UInt64, secondLength: Int) -> UInt64 {
        multiplyModP(shiftOperator(bytes: secondLength), first) ^ second
    }

    /// ``combine(_:_:secondLength:)`` with the shift operator of a fixed length precomputed
    /// (``shiftOperator(bytes:)``): one polynomial product per piece.
    @inline(__always)
    static func combine(_ first: UInt64, _ second: UInt64, shift: UInt64) -> UInt64 {
        multiplyModP(shift, first) ^ second
    }

    /// `x^(8·bytes)` modulo the polynomial, in the reflected bit order of the checksum (the
    /// operator that appends `bytes` zero bytes to a CRC's message).
    static func shiftOperator(bytes: Int) -> UInt64 {
        var product: UInt64 = 1 << 63            // x^0
        var n = UInt64(bytes)
        var power = 3                             // x^(2^3) = x^8: one byte
        while n != 0 {
            if n & 1 != 0 { product = multiplyModP(powersOfX[power & 63], product) }
            n >>= 1
            power += 1
        }
        return product
    }

    /// `x^(2^k)` modulo the polynomial, k = 0…63.
    private static let powersOfX: [UInt64] = {
        var table = [UInt64](repeating: 0, count: 64)
        table[0] = 1 << 62                        // x^1
        for k in 1..<64 { table[k] = multiplyModP(table[k - 1], table[k - 1]) }
        return table
    }()

    /// The product of two polynomials modulo the CRC polynomial, both in reflected order.
    @inline(__always)
    static func multiplyModP(_ a: UInt64, _ b: UInt64) -> UInt64 {
        var product: UInt64 = 0
        var a = a, b = b
        while a != 0 {
            if a & (1 << 63) != 0 { product ^= b }
            a <<= 1
            b = b & 1 != 0 ? (b >> 1) ^ reflectedPolynomial : b >> 1
        }
        return product
    }
}

/// A block size and the operator that shifts a CRC past one block, computed once per segment.
struct BlockGeometry: Sendable {
    let size: Int
    let shift: UInt64

    /// The layout's block size, or for a segment without tables the default one (a writer still
    /// checksums in cache-sized pieces; it just has nowhere to store them).
    init(_ layout: SegmentLayout) {
        size = layout.hasBlockChecksums ? layout.checksumBlockSize : SegmentLayout.defaultChecksumBlockSize
        shift = CRC64.shiftOperator(bytes: size)
    }
}

/// Checksums a version block by block as it is written, each block while it is still in cache:
/// the CRC of every block goes to the slot's checksum table (``SegmentLayout`` "block checksums"),
/// and the blocks' CRCs are combined into the whole version's, so a large version costs one pass
/// over memory, not a write pass and then a read pass.
///
/// Bytes are fed strictly in order, from offset 0, either in place (``absorb(_:)``, after the
/// caller wrote them) or while copying (``copy(from:to:)``).
struct BlockChecksummer {
    private let blockSize: Int
    private let blockMask: Int
    private let shift: UInt64
    /// The slot's table (one entry per block), or nil for a segment formatted without one.
    private let table: UnsafeMutableRawPointer?
    /// Bytes fed so far.
    private(set) var covered = 0
    /// The running CRC of the current block's bytes fed so far.
    private var block = CRC64()
    /// The CRC of every complete block, combined.
    private var whole: UInt64 = 0

    /// - Parameters:
    ///   - blocks: the block size (a power of two) and its shift operator.
    ///   - table: where block `k`'s CRC goes (at `8k`), or nil to only combine them.
    init(blocks: BlockGeometry, table: UnsafeMutableRawPointer?) {
        blockSize = blocks.size
        blockMask = blocks.size - 1
        shift = blocks.shift
        self.table = table
    }

    /// Feeds bytes the caller has just written (at offset ``covered``), in place.
    mutating func absorb(_ bytes: UnsafeRawBufferPointer) {
        var offset = 0
        while offset < bytes.count {
            let take = min(bytes.count - offset, blockSize - (covered & blockMask))
            block.update(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + take]))
            advance(by: take)
            offset += take
        }
    }

    /// Copies `source` to `destination` (the slot at offset ``covered``), checksumming as it goes.
    mutating func copy(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        var offset = 0
        while offset < source.count {
            let take = min(source.count - offset, blockSize - (covered & blockMask))
            block.copyAndUpdate(from: UnsafeRawBufferPointer(rebasing: source[offset..<offset + take]), to: destination + offset)
            advance(by: take)
            offset += take
        }
    }

    /// Copies `source` to `destination`, then checksums the copy, a block at a time: for a source
    /// another core just wrote, whose lines a fused pass would wait on (see
    /// ``CRC64/copyThenChecksum(from:to:)``); each block is still in cache when it is read back.
    mutating func copyThenAbsorb(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        var offset = 0
        while offset < source.count {
            let take = min(source.count - offset, blockSize - (covered & blockMask))
            (destination + offset).copyMemory(from: source.baseAddress! + offset, byteCount: take)
            absorb(UnsafeRawBufferPointer(start: destination + offset, count: take))
            offset += take
        }
    }

    private mutating func advance(by count: Int) {
        covered += count
        if covered & blockMask == 0 { closeBlock(length: blockSize) }
    }

    private mutating func closeBlock(length: Int) {
        let crc = block.value
        let index = (covered - 1) / blockSize   // a shift: blockSize is a power of two
        table?.storeBytes(of: crc.littleEndian, toByteOffset: index * 8, as: UInt64.self)
        whole = index == 0 ? crc : length == blockSize
            ? CRC64.combine(whole, crc, shift: shift) : CRC64.combine(whole, crc, secondLength: length)
        block = CRC64()
    }

    /// The CRC-64/XZ of everything fed, closing a last partial block.
    mutating func finish() -> UInt64 {
        let partial = covered & blockMask
        if partial != 0 { closeBlock(length: partial) }
        return whole
    }
}
