import Atomics

extension SegmentReader {
    /// One block of a version, verified against its checksum just before it was handed on.
    public struct VerifiedBlock {
        /// The version the block belongs to.
        public let version: UInt64
        /// Where the block starts in the version's content.
        public let offset: Int
        /// The block's bytes, in place in the shared mapping: valid during the call only.
        public let bytes: UnsafeRawBufferPointer
        /// The whole version's length.
        public let length: Int
        /// Whether this is the version's last block.
        public var isLast: Bool { offset + bytes.count == length }
    }

    /// Reads the latest version block by block, in place, verifying each block just before
    /// handing it to `consume`: a large version costs the reader one pass over memory, and no
    /// block reaches `consume` unverified.
    ///
    /// One running CRC goes over the version; at the end of each block it must equal the block's
    /// entry in the slot's checksum table (the CRC of everything up to there: LAYOUT.md, "Block
    /// checksums"), and at the end of the last, the version's CRC-64. A segment written without
    /// tables is verified whole, in place, before its first block is handed on.
    ///
    /// The blocks are in shared memory: if the writer reuses the slot while `consume` works on a
    /// block (possible only after `slotCount - 1` further publishes), the read notices when
    /// `consume` returns, and starts over from offset 0 on the newer version. A consumer that
    /// accumulates state resets it when it is handed a block at offset 0.
    ///
    /// - Parameters:
    ///   - maximumAttempts: attempts before ``SegmentError/contended(attempts:)``.
    ///   - consume: gets each block, in order; it must not keep the pointer.
    /// - Returns: the version read (its length, CRC-64 and publish time), or nil if nothing was
    ///   ever published.
    /// - Throws: ``SegmentError/blockChecksumMismatch(version:block:stored:computed:)`` or
    ///   ``SegmentError/checksumMismatch(version:stored:computed:)`` for a stable block or version
    ///   that fails its check (corruption, not a race), or what `consume` throws.
    @discardableResult
    public func readBlocks(maximumAttempts: Int = 10_000, _ consume: (VerifiedBlock) throws -> Void) throws -> CopiedVersion? {
        let blockSize = layout.checksummingBlockSize
        for _ in 0..<maximumAttempts {
            let latest: LatestSlot
            switch latestSlot() {
            case .found(let found): latest = found
            case .neverPublished: return nil
            case .retry: continue
            }
            let (version, length, stored) = (latest.version, latest.length, latest.crc64)
            let content = UnsafeRawBufferPointer(start: memory.slotData(latest.slot), count: length)
            let table = memory.checksumTable(forVersion: version)
            if table == nil {
                // No table: the whole version is verified before any block is handed on.
                let computed = CRC64.checksum(content)
                guard latest.isStillCurrent else { continue }
                guard computed == stored else { throw SegmentError.checksumMismatch(version: version, stored: stored, computed: computed) }
            }
            var offset = 0, index = 0, running = CRC64(), overtaken = false
            while offset < length {
                let block = UnsafeRawBufferPointer(rebasing: content[offset..<min(length, offset + blockSize)])
                if let table {
                    let entry = UInt64(littleEndian: table.load(fromByteOffset: index * 8, as: UInt64.self))
                    running.update(block)
                    guard latest.isStillCurrent else { overtaken = true; break }
                    guard running.value == entry else {
                        throw SegmentError.blockChecksumMismatch(version: version, block: index, stored: entry, computed: running.value)
                    }
                    // The last block closes the version: its entry must be the version's CRC-64.
                    if offset + block.count == length && entry != stored {
                        throw SegmentError.checksumMismatch(version: version, stored: stored, computed: entry)
                    }
                }
                try consume(VerifiedBlock(version: version, offset: offset, bytes: block, length: length))
                guard latest.isStillCurrent else { overtaken = true; break }
                offset += block.count
                index += 1
            }
            if overtaken { continue }
            if length == 0 && stored != 0 { throw SegmentError.checksumMismatch(version: version, stored: stored, computed: 0) }
            return CopiedVersion(version: version, length: length, crc64: stored, publishedAtNanoseconds: latest.publishedAtNanoseconds)
        }
        throw SegmentError.contended(attempts: maximumAttempts)
    }
}
