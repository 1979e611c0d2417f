import Atomics
import ShmBrokerPlatform

/// A reader's view of a segment, over a read-only mapping. Never blocks the writer, never writes.
///
/// A read looks up `latestVersion`, checks that its slot's `sequence` still names that version
/// before and after copying, and verifies the copy's CRC-64; if the writer reused the slot during
/// the copy the attempt is discarded and retried. Safe to use from several threads at once.
public final class SegmentReader: @unchecked Sendable {
    @usableFromInline let memory: SegmentMemory
    /// The wait board (writable), where this reader counts itself while it sleeps.
    let board: MappedRegion?

    /// The segment's layout, as read from its header.
    public var layout: SegmentLayout { memory.layout }

    /// Wraps a mapping of a segment, checking its header.
    ///
    /// - Parameters:
    ///   - region: a (read-only) mapping of the segment.
    ///   - board: a writable mapping of the segment's wait board (the second descriptor of the
    ///     OPEN reply). Without it, a futex wait on a segment whose writer skips wake-ups for
    ///     unregistered readers re-checks every millisecond instead.
    /// - Throws: ``SegmentError`` if the mapping is not a valid segment of this layout version.
    public init(region: MappedRegion, board: MappedRegion? = nil) throws(SegmentError) {
        memory = SegmentMemory(region: region, layout: try SegmentMemory.validate(region))
        if let board { precondition(board.isWritable && board.length >= SegmentLayout.WaitBoard.size) }
        self.board = board
    }

    /// The segment name stored in the header.
    public var name: String { memory.name }

    /// The most recent version published (0: never published).
    public var latestVersion: UInt64 { memory.latestVersion.load(ordering: .acquiring) }

    /// Whether the daemon has retired this segment.
    public var isRetired: Bool { memory.flags & SegmentLayout.Flags.retired != 0 }

    /// Whether the segment is a mirror whose source has gone quiet: its latest version may be
    /// behind the source's (see `docs/MIRROR.md`). Always false for a local segment.
    public var isStale: Bool { memory.flags & SegmentLayout.Flags.stale != 0 }

    /// When the owner formatted the segment (ns since the Unix epoch): it identifies this
    /// incarnation of the segment, kept across an owner restart through the fd store and new
    /// when the segment is created again (a mirror's epoch).
    public var createdAtNanoseconds: UInt64 { memory.load(UInt64.self, at: SegmentLayout.Header.createdAt) }

    /// The result of one read attempt.
    public enum Attempt: Sendable, Equatable {
        /// The latest version, verified.
        case snapshot(SegmentSnapshot)
        /// Nothing was ever published (distinct from an empty payload, which is a version).
        case neverPublished
        /// The writer overwrote the slot during the copy: nothing valid was read, try again.
        case retry
    }

    /// Tries once to copy the latest version out.
    ///
    /// - Throws: ``SegmentError/checksumMismatch(version:stored:computed:)`` if a stable copy
    ///   fails its CRC (corruption, not a race).
    public func readOnce() throws(SegmentError) -> Attempt {
        var copied: [UInt8] = []
        let outcome = try copyLatest { length, copy in
            copied = [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
                if length > 0 { copy(UnsafeMutableRawBufferPointer(buffer)) }
                count = length
            }
        }
        switch outcome {
        case .neverPublished: return .neverPublished
        case .retry: return .retry
        case .copied(let info):
            return .snapshot(SegmentSnapshot(version: info.version, bytes: copied, crc64: info.crc64,
                                             publishedAtNanoseconds: info.publishedAtNanoseconds))
        }
    }

    /// Metadata of a version copied into a caller's buffer.
    public struct CopiedVersion: Sendable, Equatable {
        public var version: UInt64
        public var length: Int
        public var crc64: UInt64
        public var publishedAtNanoseconds: UInt64
    }

    /// The result of one attempt to copy into a caller's buffer.
    public enum CopyAttempt: Sendable, Equatable {
        case copied(CopiedVersion)
        case neverPublished
        case retry
    }

    /// Tries once to copy the latest version into `buffer` (reusable, no allocation), verified.
    ///
    /// - Throws: ``SegmentError/payloadTooLarge(length:capacity:)`` if `buffer` is shorter than
    ///   the version (its `capacity` names the length needed), or a CRC mismatch.
    public func readOnce(into buffer: UnsafeMutableRawBufferPointer) throws(SegmentError) -> CopyAttempt {
        try copyLatest { length, copy throws(SegmentError) in
            guard length <= buffer.count else { throw .payloadTooLarge(length: length, capacity: buffer.count) }
            if length > 0 { copy(buffer) }
        }
    }

    /// What the header says of the latest version's slot, read as LAYOUT.md's read begins.
    struct LatestSlot {
        let version: UInt64
        let slot: Int
        let sequence: UnsafeAtomic<UInt64>
        let length: Int
        let crc64: UInt64
        let publishedAtNanoseconds: UInt64

        /// Whether the slot still holds this version (an acquire fence, then the sequence).
        var isStillCurrent: Bool {
            atomicMemoryFence(ordering: .acquiring)
            return sequence.load(ordering: .relaxed) == version
        }
    }

    /// What looking up the latest version's slot found.
    enum SlotLookup {
        case found(LatestSlot)
        /// Nothing was ever published.
        case neverPublished
        /// The writer is rewriting the slot (or the header was read torn): look again.
        case retry
    }

    /// Looks up the latest version's slot, as every read begins.
    func latestSlot() -> SlotLookup {
        let version = memory.latestVersion.load(ordering: .acquiring)
        if version == 0 { return .neverPublished }
        let slot = layout.slotOffset(forVersion: version)
        let sequence = memory.slotSequence(slot)
        guard sequence.load(ordering: .acquiring) == version else { return .retry }
        let length = Int(memory.load(UInt64.self, at: slot + SegmentLayout.Slot.length))
        guard length <= layout.capacity else { return .retry }  // a torn header read
        return .found(LatestSlot(version: version, slot: slot, sequence: sequence, length: length,
                          crc64: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.crc64),
                          publishedAtNanoseconds: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.publishedAt)))
    }

    /// The seqlock read shared by every copying read: `provide` receives the length and a function
    /// that copies (and checksums) the content into the buffer it is given.
    private func copyLatest(
        _ provide: (Int, (UnsafeMutableRawBufferPointer) -> Void) throws(SegmentError) -> Void
    ) throws(SegmentError) -> CopyAttempt {
        let latest: LatestSlot
        switch latestSlot() {
        case .found(let found): latest = found
        case .neverPublished: return .neverPublished
        case .retry: return .retry
        }
        // Copy-out and CRC in one pass; the CRC covers exactly the bytes copied.
        var computed: UInt64 = 0
        let source = UnsafeRawBufferPointer(start: memory.slotData(latest.slot), count: latest.length)
        try provide(latest.length) { destination in
            computed = CRC64.copyAndChecksum(from: source, to: destination.baseAddress!)
        }
        guard latest.isStillCurrent else { return .retry }
        guard computed == latest.crc64 else {
            throw .checksumMismatch(version: latest.version, stored: latest.crc64, computed: computed)
        }
        return .copied(CopiedVersion(version: latest.version, length: latest.length, crc64: latest.crc64,
                                     publishedAtNanoseconds: latest.publishedAtNanoseconds))
    }

    /// Reads the latest version, retrying while the writer races the copy.
    ///
    /// - Parameter maximumAttempts: attempts before giving up with ``SegmentError/contended(attempts:)``.
    /// - Returns: the latest verified version, or nil if nothing was ever published.
    public func read(maximumAttempts: Int = 10_000) throws(SegmentError) -> SegmentSnapshot? {
        for _ in 0..<maximumAttempts {
            switch try readOnce() {
            case .snapshot(let snapshot): return snapshot
            case .neverPublished: return nil
            case .retry: continue
            }
        }
        throw .contended(attempts: maximumAttempts)
    }

    /// A version read in place, without copying: valid only while ``isStillCurrent`` holds.
    public struct BorrowedVersion {
        public let version: UInt64
        /// The content inside the shared mapping. The writer may reuse this slot after
        /// `slotCount - 1` further publishes; anything derived from it counts only if the borrow
        /// was still valid afterwards (``SegmentReader/withLatestVersion(verifyingChecksum:maximumAttempts:_:)``
        /// checks that for you).
        public let bytes: UnsafeRawBufferPointer
        public let crc64: UInt64
        public let publishedAtNanoseconds: UInt64
        let sequence: UnsafeAtomic<UInt64>

        /// Whether the slot still holds this version.
        public var isStillCurrent: Bool {
            atomicMemoryFence(ordering: .acquiring)
            return sequence.load(ordering: .relaxed) == version
        }
    }

    /// Runs `body` on the latest version in place (zero-copy), and returns its result only if the
    /// version stayed intact throughout; otherwise runs it again on the newer version.
    ///
    /// - Parameters:
    ///   - verifyingChecksum: check the CRC-64 of the bytes in place before calling `body`.
    ///   - maximumAttempts: attempts before ``SegmentError/contended(attempts:)``.
    ///   - body: reads the borrowed bytes; it may run more than once, so it should have no side
    ///     effects beyond its result, and must not keep the pointer.
    /// - Returns: `body`'s result, or nil if nothing was ever published.
    public func withLatestVersion<R>(
        verifyingChecksum: Bool = true, maximumAttempts: Int = 10_000, _ body: (BorrowedVersion) throws -> R
    ) throws -> R? {
        for _ in 0..<maximumAttempts {
            let latest: LatestSlot
            switch latestSlot() {
            case .found(let found): latest = found
            case .neverPublished: return nil
            case .retry: continue
            }
            let version = latest.version
            let borrowed = BorrowedVersion(
                version: version, bytes: UnsafeRawBufferPointer(start: memory.slotData(latest.slot), count: latest.length),
                crc64: latest.crc64, publishedAtNanoseconds: latest.publishedAtNanoseconds, sequence: latest.sequence)
            if verifyingChecksum {
                let computed = CRC64.checksum(borrowed.bytes)
                guard borrowed.isStillCurrent else { continue }
                guard computed == borrowed.crc64 else {
                    throw SegmentError.checksumMismatch(version: version, stored: borrowed.crc64, computed: computed)
                }
            }
            let result = try body(borrowed)
            if borrowed.isStillCurrent { return result }
        }
        throw SegmentError.contended(attempts: maximumAttempts)
    }

    /// How a thread waits for the next version.
    public enum WaitStrategy: Sendable, Equatable {
        /// Sleep in the kernel on the header's futex word until the writer wakes it: no CPU used
        /// while waiting; a wake-up costs the writer a system call and the reader a context
        /// switch (2–4 µs on the writer's core, about 20 µs from an idle one on a VM).
        case futex
        /// Busy-poll the version word: sees a new version within about a cache-line transfer
        /// (well under a microsecond) but keeps one core fully busy. For a reader that owns a core.
        case spin
        /// Busy-poll for up to `nanoseconds`, then sleep on the futex: low latency while versions
        /// come often, no burnt core when they stop.
        case spinThenFutex(nanoseconds: UInt64)
    }

    /// Blocks the calling thread until a version newer than `version` exists, the segment is
    /// retired, or the timeout passes, waiting as `strategy` says. No socket is involved.
    ///
    /// - Parameters:
    ///   - version: the version the caller already has.
    ///   - timeoutNanoseconds: the longest wait; nil waits indefinitely.
    ///   - strategy: sleep on the futex (default), spin, or spin for a while and then sleep.
    /// - Returns: the latest version when it returned (equal to `version` on timeout).
    public func waitForVersion(after version: UInt64, timeoutNanoseconds: UInt64?, strategy: WaitStrategy = .futex) -> UInt64 {
        let start = Clock.monotonicNanoseconds()
        let deadline = timeoutNanoseconds.map { start &+ $0 }
        switch strategy {
        case .futex:
            break
        case .spin:
            return spin(after: version, until: deadline)
        case .spinThenFutex(let bound):
            let spinUntil = deadline.map { min($0, start &+ bound) } ?? start &+ bound
            let latest = spin(after: version, until: spinUntil)
            if latest > version || isRetired { return latest }
        }
        // Count this thread as a sleeper (sequentially consistent, then re-check below) so the
        // writer wakes it; a segment whose writer relies on the board, read without one, is
        // re-checked every millisecond instead.
        let registered = board.map { UnsafeAtomic<UInt32>(at: ($0.base + SegmentLayout.WaitBoard.sleepers)
            .assumingMemoryBound(to: UInt32.AtomicRepresentation.self)) }
        registered?.wrappingIncrement(ordering: .sequentiallyConsistent)
        defer { registered?.wrappingDecrement(ordering: .sequentiallyConsistent) }
        let unannounced = registered == nil && memory.flags & SegmentLayout.Flags.sleeperBoard != 0
        while true {
            let word = memory.futexWord.load(ordering: .acquiring)
            let latest = latestVersion
            if latest > version || isRetired { return latest }
            var remaining: UInt64? = unannounced ? 1_000_000 : nil
            if let deadline {
                let now = Clock.monotonicNanoseconds()
                if now >= deadline { return latest }
                remaining = min(deadline - now, remaining ?? .max)
            }
            _ = Futex.wait(on: memory.futexAddress, whileEqualTo: word, timeoutNanoseconds: remaining)
        }
    }

    /// Polls `latestVersion` (a plain load, no system call) until it passes `version`, the
    /// segment is retired, or the monotonic clock reaches `deadline` (checked every 256 polls).
    private func spin(after version: UInt64, until deadline: UInt64?) -> UInt64 {
        var polls = 0
        while true {
            let latest = memory.latestVersion.load(ordering: .acquiring)
            if latest > version { return latest }
            polls &+= 1
            if polls & 255 == 0 {
                if isRetired { return latest }
                if let deadline, Clock.monotonicNanoseconds() >= deadline { return latest }
            }
            Spin.relax()
        }
    }
}
