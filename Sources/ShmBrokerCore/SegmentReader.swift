import Atomics
import ShmBrokerPlatform

/// A reader's view of a segment, over a read-only mapping. Never blocks the writer, never writes.
///
/// A read looks up `latestVersion`, checks that its slot's `sequence` still names that version
/// before and after copying, and verifies the copy's CRC-64; if the writer reused the slot during
/// the copy the attempt is discarded and retried. Safe to use from several threads at once.
public final class SegmentReader: @unchecked Sendable {
    @usableFromInline let memory: SegmentMemory

    /// The segment's layout, as read from its header.
    public var layout: SegmentLayout { memory.layout }

    /// Wraps a mapping of a segment, checking its header.
    /// - Throws: ``SegmentError`` if the mapping is not a valid segment of this layout version.
    public init(region: MappedRegion) throws(SegmentError) {
        memory = SegmentMemory(region: region, layout: try SegmentMemory.validate(region))
    }

    /// The segment name stored in the header.
    public var name: String { memory.name }

    /// The most recent version published (0: never published).
    public var latestVersion: UInt64 { memory.latestVersion.load(ordering: .acquiring) }

    /// Whether the daemon has retired this segment.
    public var isRetired: Bool { memory.flags & SegmentLayout.Flags.retired != 0 }

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
        let version = memory.latestVersion.load(ordering: .acquiring)
        if version == 0 { return .neverPublished }
        let slot = layout.slotOffset(forVersion: version)
        let sequence = memory.slotSequence(slot)
        guard sequence.load(ordering: .acquiring) == version else { return .retry }
        let length = Int(memory.load(UInt64.self, at: slot + SegmentLayout.Slot.length))
        let storedCRC = memory.load(UInt64.self, at: slot + SegmentLayout.Slot.crc64)
        let publishedAt = memory.load(UInt64.self, at: slot + SegmentLayout.Slot.publishedAt)
        guard length <= layout.capacity else { return .retry }
        var computed: UInt64 = 0
        // Copy-out and CRC in one pass; the CRC covers exactly the bytes copied.
        let bytes = [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
            if let destination = buffer.baseAddress, length > 0 {
                computed = CRC64.copyAndChecksum(from: UnsafeRawBufferPointer(start: memory.slotData(slot), count: length),
                                                 to: destination)
            }
            count = length
        }
        atomicMemoryFence(ordering: .acquiring)
        guard sequence.load(ordering: .relaxed) == version else { return .retry }
        guard computed == storedCRC else {
            throw .checksumMismatch(version: version, stored: storedCRC, computed: computed)
        }
        return .snapshot(SegmentSnapshot(version: version, bytes: bytes, crc64: storedCRC, publishedAtNanoseconds: publishedAt))
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
            let version = memory.latestVersion.load(ordering: .acquiring)
            if version == 0 { return nil }
            let slot = layout.slotOffset(forVersion: version)
            let sequence = memory.slotSequence(slot)
            guard sequence.load(ordering: .acquiring) == version else { continue }
            let length = Int(memory.load(UInt64.self, at: slot + SegmentLayout.Slot.length))
            guard length <= layout.capacity else { continue }
            let borrowed = BorrowedVersion(
                version: version, bytes: UnsafeRawBufferPointer(start: memory.slotData(slot), count: length),
                crc64: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.crc64),
                publishedAtNanoseconds: memory.load(UInt64.self, at: slot + SegmentLayout.Slot.publishedAt),
                sequence: sequence)
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

    /// Blocks the calling thread until a version newer than `version` exists, the segment is
    /// retired, or the timeout passes. Uses the header's futex word: no polling, no socket.
    ///
    /// - Parameters:
    ///   - version: the version the caller already has.
    ///   - timeoutNanoseconds: the longest wait; nil waits indefinitely.
    /// - Returns: the latest version when it returned (equal to `version` on timeout).
    public func waitForVersion(after version: UInt64, timeoutNanoseconds: UInt64?) -> UInt64 {
        let deadline = timeoutNanoseconds.map { Clock.monotonicNanoseconds() &+ $0 }
        while true {
            let word = memory.futexWord.load(ordering: .acquiring)
            let latest = latestVersion
            if latest > version || isRetired { return latest }
            var remaining: UInt64? = nil
            if let deadline {
                let now = Clock.monotonicNanoseconds()
                if now >= deadline { return latest }
                remaining = deadline - now
            }
            _ = Futex.wait(on: memory.futexAddress, whileEqualTo: word, timeoutNanoseconds: remaining)
        }
    }
}
