import Atomics
import ShmBrokerPlatform
import ShmBrokerProtocol

/// The single writer of a segment: formats it, publishes versions, retires it.
///
/// Publishing never waits for readers. Version `v` goes into slot `v % slotCount`, a slot no reader
/// of the current version is using; the slot's `sequence` is cleared before its bytes change and
/// set to `v` afterwards, so a reader that overlapped the write notices and retries (a seqlock per
/// slot). Only then does `latestVersion` move to `v` and the futex word wake waiters.
///
/// Not thread-safe: exactly one thread of one process may publish to a segment.
public final class SegmentWriter: @unchecked Sendable {
    @usableFromInline let memory: SegmentMemory
    /// The wait board's mapping and its sleeper count; without one, every publish wakes.
    public let board: MappedRegion?
    private let sleepers: UnsafeAtomic<UInt32>?
    /// The block size versions are checksummed in (`SegmentLayout.checksummingBlockSize`).
    private let blockSize: Int

    /// The segment's layout.
    public var layout: SegmentLayout { memory.layout }
    /// The mapping this writer publishes into.
    public var region: MappedRegion { memory.region }

    /// Formats a fresh (zero-filled) writable mapping as an empty segment: version 0, never published.
    ///
    /// - Parameters:
    ///   - region: a writable mapping of at least `layout.totalSize` bytes.
    ///   - layout: capacity and slot count.
    ///   - name: the segment name recorded in the header (at most 64 UTF-8 bytes).
    ///   - board: a writable mapping of the segment's wait board (``SegmentLayout/WaitBoard``), or
    ///     nil to wake futex waiters on every publish.
    public init(formatting region: MappedRegion, layout: SegmentLayout, name: String, board: MappedRegion? = nil) {
        precondition(region.isWritable && region.length >= layout.totalSize)
        memory = SegmentMemory(region: region, layout: layout)
        self.board = board
        sleepers = board.map(Self.sleeperCount)
        blockSize = layout.checksummingBlockSize
        memory.store(SegmentLayout.layoutVersion, at: SegmentLayout.Header.layoutVersion)
        memory.store(UInt32(SegmentLayout.headerSize), at: SegmentLayout.Header.headerSize)
        memory.store(UInt64(layout.capacity), at: SegmentLayout.Header.capacity)
        memory.store(UInt32(layout.slotCount), at: SegmentLayout.Header.slotCount)
        memory.store(Self.baseFlags(layout, board: board), at: SegmentLayout.Header.flags)
        memory.store(UInt32(layout.checksumBlockSize), at: SegmentLayout.Header.checksumBlockSize)
        memory.store(UInt64(layout.slotStride), at: SegmentLayout.Header.slotStride)
        memory.store(Clock.realtimeNanoseconds(), at: SegmentLayout.Header.createdAt)
        let nameBytes = Array(name.utf8.prefix(SegmentLayout.maximumNameLength))
        UnsafeMutableRawBufferPointer(start: region.base + SegmentLayout.Header.name, count: SegmentLayout.maximumNameLength)
            .copyBytes(from: nameBytes + [UInt8](repeating: 0, count: SegmentLayout.maximumNameLength - nameBytes.count))
        memory.latestVersion.store(0, ordering: .relaxed)
        // The magic goes last: a half-formatted segment is never mistaken for a valid one.
        atomicMemoryFence(ordering: .releasing)
        memory.store(SegmentLayout.magic, at: SegmentLayout.Header.magic)
    }

    /// Takes over a segment written by an earlier writer process (after a restart), checking its
    /// header and the CRC-64 of its current version. Publishing continues from that version.
    ///
    /// - Parameters:
    ///   - region: a writable mapping of the whole segment.
    ///   - board: the segment's wait board (the earlier writer's, so sleeping readers stay
    ///     counted), or nil to wake on every publish.
    /// - Throws: ``SegmentError`` if the header is not valid or the current version fails its CRC.
    public init(adopting region: MappedRegion, board: MappedRegion? = nil) throws(SegmentError) {
        precondition(region.isWritable)
        let layout = try SegmentMemory.validate(region)
        memory = SegmentMemory(region: region, layout: layout)
        self.board = board
        sleepers = board.map(Self.sleeperCount)
        blockSize = layout.checksummingBlockSize
        let version = memory.latestVersion.load(ordering: .acquiring)
        if version > 0 {
            let slot = layout.slotOffset(forVersion: version)
            let sequence = memory.slotSequence(slot).load(ordering: .acquiring)
            guard sequence == version else {
                throw .inconsistentHeader("slot of version \(version) holds sequence \(sequence)")
            }
            let length = Int(memory.load(UInt64.self, at: slot + SegmentLayout.Slot.length))
            guard length <= layout.capacity else {
                throw .inconsistentHeader("version \(version) claims \(length) bytes, capacity is \(layout.capacity)")
            }
            let stored = memory.load(UInt64.self, at: slot + SegmentLayout.Slot.crc64)
            // Recomputed block by block into a scratch table, so that both the whole CRC and
            // every block's table entry are checked.
            var scratch = [UInt64](repeating: 0, count: max((length + blockSize - 1) / blockSize, 1))
            let computed = scratch.withUnsafeMutableBytes { table in
                var checksummer = BlockChecksummer(blockSize: blockSize, table: table.baseAddress)
                checksummer.absorb(UnsafeRawBufferPointer(start: memory.slotData(slot), count: length))
                return checksummer.finish()
            }
            guard stored == computed else { throw .checksumMismatch(version: version, stored: stored, computed: computed) }
            if let table = memory.checksumTable(forVersion: version) {
                for block in 0..<(length + blockSize - 1) / blockSize {
                    let entry = UInt64(littleEndian: table.load(fromByteOffset: block * 8, as: UInt64.self))
                    guard entry == scratch[block] else {
                        throw .inconsistentHeader("version \(version): checksum of block \(block) is \(String(entry, radix: 16)), its bytes give \(String(scratch[block], radix: 16))")
                    }
                }
            }
        }
        // A previous writer may have died while its retired flag was set; adoption revives it.
        memory.atomic32(at: SegmentLayout.Header.flags).store(Self.baseFlags(layout, board: board), ordering: .releasing)
    }

    /// The flags of a live segment: the board's and the tables' bits, nothing retired or stale.
    private static func baseFlags(_ layout: SegmentLayout, board: MappedRegion?) -> UInt32 {
        (board == nil ? 0 : SegmentLayout.Flags.sleeperBoard) | (layout.hasBlockChecksums ? SegmentLayout.Flags.blockChecksums : 0)
    }

    private static func sleeperCount(_ board: MappedRegion) -> UnsafeAtomic<UInt32> {
        precondition(board.isWritable && board.length >= SegmentLayout.WaitBoard.size)
        return UnsafeAtomic(at: (board.base + SegmentLayout.WaitBoard.sleepers).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }

    /// The name stored in the header.
    public var name: String { memory.name }

    /// The most recent version published (0: never published).
    public var latestVersion: UInt64 { memory.latestVersion.load(ordering: .relaxed) }

    /// The receipt of the latest version, if any. Safe to call from another thread while this
    /// writer publishes: the slot's sequence is checked around the read, as a reader does.
    public var latestReceipt: PublishReceipt? {
        while true {
            let version = memory.latestVersion.load(ordering: .acquiring)
            guard version > 0 else { return nil }
            let slot = layout.slotOffset(forVersion: version)
            let sequence = memory.slotSequence(slot)
            guard sequence.load(ordering: .acquiring) == version else { continue }
            let receipt = PublishReceipt(
                version: version,
                length: Int(memory.load(UInt64.self, at: slot + SegmentLayout.Slot.length)),
                crc64: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.crc64),
                publishedAtNanoseconds: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.publishedAt))
            atomicMemoryFence(ordering: .acquiring)
            if sequence.load(ordering: .relaxed) == version { return receipt }
        }
    }

    /// Where the bytes of a publish come from, which decides how they are copied into the slot.
    public enum Source: Sendable {
        /// Memory another core just wrote (a producer's ring, a request's buffer): mid sizes are
        /// copied, then checksummed from the copy (``CRC64/copyThenChecksum(from:to:)``).
        case writtenByAnotherCore
        /// Memory in this thread's cache (an in-process owner's buffer): always one fused pass,
        /// about 1.2x faster at 64 KiB to a reader on the other core (measured with `shmbroker-bench`).
        case local
    }

    /// Publishes `bytes` as the next version.
    ///
    /// - Parameters:
    ///   - bytes: the payload.
    ///   - source: where `bytes` lives, for the choice of copy (default: written by another core).
    /// - Throws: ``SegmentError/payloadTooLarge(length:capacity:)`` (nothing written) if it does not fit.
    /// - Returns: the new version, its length and its CRC-64.
    @discardableResult
    public func publish(_ bytes: UnsafeRawBufferPointer, source: Source = .writtenByAnotherCore) throws(SegmentError) -> PublishReceipt {
        guard bytes.count <= layout.capacity else {
            throw .payloadTooLarge(length: bytes.count, capacity: layout.capacity)
        }
        let (version, slot, table) = beginWrite()
        let twoPass = source == .writtenByAnotherCore && CRC64.isHardwareAccelerated && CRC64.twoPassPublishSizes.contains(bytes.count)
        if bytes.count <= blockSize {
            // One block (most versions): no block loop.
            let crc = twoPass ? CRC64.copyThenChecksum(from: bytes, to: memory.slotData(slot))
                              : CRC64.copyAndChecksum(from: bytes, to: memory.slotData(slot))
            return commitSingleBlock(version: version, slot: slot, table: table, length: bytes.count, crc: crc)
        }
        // Copy and checksum a block at a time: in one pass, or for mid sizes copy then checksum
        // each block while it is in cache (see CRC64.copyThenChecksum).
        var checksummer = BlockChecksummer(blockSize: blockSize, table: table)
        if twoPass {
            checksummer.copyThenAbsorb(from: bytes, to: memory.slotData(slot))
        } else {
            checksummer.copy(from: bytes, to: memory.slotData(slot))
        }
        return commit(version: version, slot: slot, length: bytes.count, crc: checksummer.finish())
    }

    /// Publishes the next version by letting `fill` write exactly `length` bytes into its slot.
    ///
    /// If `fill` throws, the slot is left marked as being written and the latest version is
    /// unchanged: readers keep reading the previous version, and the error is rethrown.
    ///
    /// - Parameters:
    ///   - length: the payload's length; checked against the capacity before anything is touched.
    ///   - fill: writes the payload into the buffer it is given (exactly `length` bytes long).
    @discardableResult
    public func publish<E: Error>(
        length: Int, fill: (UnsafeMutableRawBufferPointer) throws(E) -> Void
    ) throws(PublishFailure<E>) -> PublishReceipt {
        let reservation: SlotReservation
        do {
            reservation = try reserve(length: length)
        } catch {
            throw .segment(error)
        }
        do {
            try fill(reservation.buffer)
        } catch {
            throw .fill(error)
        }
        return commit(reservation)
    }

    /// Publishes the next version by letting `fill` write it into its slot one block at a time,
    /// in order; each block is checksummed right after `fill` returns, while it is still in cache,
    /// so the version costs one pass over memory (``publish(length:fill:)`` checksums the whole
    /// slot afterwards, a second pass once the version outgrows the cache).
    ///
    /// If `fill` throws, the slot is left marked as being written and the latest version is
    /// unchanged: readers keep reading the previous version, and the error is rethrown.
    ///
    /// - Parameters:
    ///   - length: the payload's length; checked against the capacity before anything is touched.
    ///   - fill: writes the block it is given, which starts `offset` bytes into the payload and is
    ///     ``SegmentLayout/checksumBlockSize`` bytes long (the last one may be shorter).
    @discardableResult
    public func publish<E: Error>(
        length: Int, fillingBlocks fill: (_ block: UnsafeMutableRawBufferPointer, _ offset: Int) throws(E) -> Void
    ) throws(PublishFailure<E>) -> PublishReceipt {
        var reservation: SlotReservation
        do {
            reservation = try reserve(length: length)
        } catch {
            throw .segment(error)
        }
        var offset = 0
        while offset < length {
            let block = UnsafeMutableRawBufferPointer(rebasing: reservation.buffer[offset..<min(length, offset + blockSize)])
            do {
                try fill(block, offset)
            } catch {
                throw .fill(error)
            }
            reservation.markWritten(through: offset + block.count)
            offset += block.count
        }
        return commit(reservation)
    }

    /// The next version's slot, claimed for a caller that fills it over time (a loan): readers
    /// keep reading the latest version until ``commit(_:)``; a reservation never committed leaves
    /// everything as it was (the next publish claims the same slot).
    ///
    /// A reservation filled in order can be checksummed as it goes, each piece while it is still
    /// in cache: ``append(_:)`` copies and checksums in one pass; a caller that writes into
    /// ``buffer`` itself says how far it got with ``markWritten(through:)``. Whatever is not
    /// checksummed by then is checksummed in place by the commit.
    public struct SlotReservation {
        let version: UInt64
        let slot: Int
        let table: UnsafeMutableRawPointer?
        /// Where the payload goes: exactly the length reserved.
        public let buffer: UnsafeMutableRawBufferPointer
        var checksummer: BlockChecksummer

        /// Bytes of the payload final and checksummed so far (appended or marked written).
        public var written: Int { checksummer.covered }

        /// Copies `bytes` into the buffer after the bytes already written, checksumming them in
        /// the same pass.
        ///
        /// - Precondition: they fit: `written + bytes.count <= buffer.count`.
        public mutating func append(_ bytes: UnsafeRawBufferPointer) {
            precondition(bytes.count <= buffer.count - written, "appending \(bytes.count) bytes after \(written) of \(buffer.count)")
            checksummer.copy(from: bytes, to: buffer.baseAddress! + written)
        }

        /// Declares the first `end` bytes of the buffer final: those not yet checksummed are
        /// checksummed now, while the caller's writes are still in cache. They must not change
        /// afterwards (a reader would find them corrupt).
        ///
        /// - Precondition: `written <= end <= buffer.count`.
        public mutating func markWritten(through end: Int) {
            precondition(end >= written && end <= buffer.count, "marking \(end) bytes written, \(written) already, \(buffer.count) reserved")
            checksummer.absorb(UnsafeRawBufferPointer(rebasing: buffer[written..<end]))
        }
    }

    /// Claims the next version's slot for `length` bytes.
    ///
    /// - Throws: ``SegmentError/payloadTooLarge(length:capacity:)`` (nothing touched) if it does not fit.
    public func reserve(length: Int) throws(SegmentError) -> SlotReservation {
        guard length >= 0, length <= layout.capacity else { throw .payloadTooLarge(length: length, capacity: layout.capacity) }
        let (version, slot, table) = beginWrite()
        return SlotReservation(version: version, slot: slot, table: table,
                               buffer: UnsafeMutableRawBufferPointer(start: memory.slotData(slot), count: length),
                               checksummer: BlockChecksummer(blockSize: blockSize, table: table))
    }

    /// Makes a reservation's bytes the latest version: checksums in place those not yet
    /// checksummed (appended or marked written), then commits.
    /// Nothing may publish to the segment between ``reserve(length:)`` and this call.
    @discardableResult
    public func commit(_ reservation: consuming SlotReservation) -> PublishReceipt {
        precondition(reservation.version == latestVersion &+ 1, "another version was published during the reservation")
        let length = reservation.buffer.count
        if reservation.written == 0 && length <= blockSize {
            // One block, filled in place (most versions): no block loop.
            return commitSingleBlock(version: reservation.version, slot: reservation.slot, table: reservation.table,
                                     length: length, crc: CRC64.checksum(UnsafeRawBufferPointer(reservation.buffer)))
        }
        reservation.markWritten(through: length)
        return commit(version: reservation.version, slot: reservation.slot, length: length, crc: reservation.checksummer.finish())
    }

    /// Commits a version of at most one block, whose only table entry is its CRC.
    private func commitSingleBlock(version: UInt64, slot: Int, table: UnsafeMutableRawPointer?, length: Int, crc: UInt64) -> PublishReceipt {
        if length > 0, let table { table.storeBytes(of: crc.littleEndian, as: UInt64.self) }
        return commit(version: version, slot: slot, length: length, crc: crc)
    }

    /// Claims the slot of the next version: its sequence is cleared before any byte changes.
    private func beginWrite() -> (version: UInt64, slot: Int, table: UnsafeMutableRawPointer?) {
        let version = latestVersion &+ 1
        let (slot, table) = memory.slotAndTable(forVersion: version)
        memory.slotSequence(slot).store(0, ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        return (version, slot, table)
    }

    /// Publishes `bytes` as version `version` of a segment that holds no version yet: how a
    /// version saved to disk comes back after a stop or a reboot, with its number and time.
    ///
    /// - Parameters:
    ///   - bytes: the saved content.
    ///   - version: its version number (at least 1); the next publish continues from it.
    ///   - expectedCRC: the saved CRC-64; the copy must match it, or nothing becomes visible.
    ///   - publishedAtNanoseconds: the saved publish time.
    /// - Throws: ``SegmentError`` if the segment already has a version, the content does not fit,
    ///   or the CRC does not match.
    @discardableResult
    public func restore(_ bytes: UnsafeRawBufferPointer, version: UInt64, expectedCRC: UInt64,
                        publishedAtNanoseconds: UInt64) throws(SegmentError) -> PublishReceipt {
        guard latestVersion == 0 else {
            throw .inconsistentHeader("cannot restore version \(version) into a segment at version \(latestVersion)")
        }
        return try publish(bytes, atVersion: version, expectedCRC: expectedCRC, publishedAtNanoseconds: publishedAtNanoseconds)
    }

    /// Publishes `bytes` as version `version`, which must be greater than the latest (gaps are
    /// allowed): how a mirror serves another host's versions under their own numbers. The copy
    /// is checksummed as it is made and must match `expectedCRC` before anything becomes
    /// visible; when the version's slot is the latest version's, the bytes are checked first,
    /// so that a mismatch never takes the latest version away from readers.
    ///
    /// - Parameters:
    ///   - bytes: the content.
    ///   - version: its version number; the next plain publish continues from it.
    ///   - expectedCRC: the CRC-64/XZ the source computed.
    ///   - publishedAtNanoseconds: the source's publish time (ns since the Unix epoch).
    /// - Throws: ``SegmentError/versionNotAfterLatest(version:latest:)``,
    ///   ``SegmentError/payloadTooLarge(length:capacity:)`` or
    ///   ``SegmentError/checksumMismatch(version:stored:computed:)``; the segment is unchanged.
    @discardableResult
    public func publish(_ bytes: UnsafeRawBufferPointer, atVersion version: UInt64, expectedCRC: UInt64,
                        publishedAtNanoseconds: UInt64) throws(SegmentError) -> PublishReceipt {
        let latest = latestVersion
        guard version > latest else { throw .versionNotAfterLatest(version: version, latest: latest) }
        guard bytes.count <= layout.capacity else { throw .payloadTooLarge(length: bytes.count, capacity: layout.capacity) }
        let (slot, table) = memory.slotAndTable(forVersion: version)
        if latest != 0, slot == layout.slotOffset(forVersion: latest) {
            let crc = CRC64.checksum(bytes)
            guard crc == expectedCRC else { throw .checksumMismatch(version: version, stored: expectedCRC, computed: crc) }
        }
        memory.slotSequence(slot).store(0, ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        var checksummer = BlockChecksummer(blockSize: blockSize, table: table)
        checksummer.copy(from: bytes, to: memory.slotData(slot))
        let crc = checksummer.finish()
        guard crc == expectedCRC else { throw .checksumMismatch(version: version, stored: expectedCRC, computed: crc) }
        return commit(version: version, slot: slot, length: bytes.count, crc: crc, at: publishedAtNanoseconds)
    }

    /// Raises or clears the header's `stale` flag (a mirror's source went quiet, or was heard
    /// again). Readers see it with their next look at the header; nobody is woken.
    public func setStale(_ stale: Bool) {
        let flags = memory.atomic32(at: SegmentLayout.Header.flags)
        if stale {
            _ = flags.loadThenBitwiseOr(with: SegmentLayout.Flags.stale, ordering: .releasing)
        } else {
            _ = flags.loadThenBitwiseAnd(with: ~SegmentLayout.Flags.stale, ordering: .releasing)
        }
    }

    /// Whether the header's `stale` flag is raised.
    public var isStale: Bool { memory.flags & SegmentLayout.Flags.stale != 0 }

    /// Records the slot's metadata, then makes the version visible and wakes waiters.
    private func commit(version: UInt64, slot: Int, length: Int, crc: UInt64, at time: UInt64? = nil) -> PublishReceipt {
        let now = time ?? Clock.realtimeNanoseconds()
        memory.store(UInt64(length), at: slot + SegmentLayout.Slot.length)
        memory.store(crc, at: slot + SegmentLayout.Slot.crc64)
        memory.store(now, at: slot + SegmentLayout.Slot.publishedAt)
        memory.slotSequence(slot).store(version, ordering: .releasing)
        memory.latestVersion.store(version, ordering: .releasing)
        wakeWaiters()
        return PublishReceipt(version: version, length: length, crc64: crc, publishedAtNanoseconds: now)
    }

    /// Marks the segment retired: readers' waits return and reads report ``SegmentError/retired``.
    public func retire() {
        _ = memory.atomic32(at: SegmentLayout.Header.flags).loadThenBitwiseOr(with: SegmentLayout.Flags.retired, ordering: .releasing)
        memory.futexWord.wrappingIncrement(ordering: .sequentiallyConsistent)
        wakeAllWaiters()
    }

    /// Bumps the futex word and wakes its sleepers, unless the wait board says there are none:
    /// then a publish makes no system call. The increment and the board's load are sequentially
    /// consistent, pairing with a reader's "count myself, then re-check the version": either the
    /// writer sees the sleeper, or the sleeper sees the new version and does not sleep.
    private func wakeWaiters() {
        memory.futexWord.wrappingIncrement(ordering: .sequentiallyConsistent)
        if let sleepers, sleepers.load(ordering: .sequentiallyConsistent) == 0 { return }
        Futex.wakeAll(memory.futexAddress)
    }

    /// Wakes every futex waiter whatever the board says: a backstop, called now and then by the
    /// owner for segments that changed, so a reader whose count another reader erased (the board
    /// is writable by every reader) waits at most until the next backstop, never forever.
    public func wakeAllWaiters() {
        Futex.wakeAll(memory.futexAddress)
    }
}

/// A failure of ``SegmentWriter/publish(length:fill:)``: the segment refused, or the fill threw.
public enum PublishFailure<FillError: Error>: Error {
    case segment(SegmentError)
    case fill(FillError)
}


extension SegmentWriter {
    /// Publishes `bytes`, a convenience for byte arrays.
    @discardableResult
    public func publish(_ bytes: [UInt8]) throws(SegmentError) -> PublishReceipt {
        let outcome = bytes.withUnsafeBytes { buffer in
            Result { () throws(SegmentError) in try publish(buffer) }
        }
        return try outcome.get()
    }
}
