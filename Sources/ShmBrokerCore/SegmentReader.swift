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
        let bytes = [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
            UnsafeMutableRawBufferPointer(buffer).copyMemory(
                from: UnsafeRawBufferPointer(start: memory.slotData(slot), count: length))
            count = length
        }
        atomicMemoryFence(ordering: .acquiring)
        guard sequence.load(ordering: .relaxed) == version else { return .retry }
        let computed = bytes.withUnsafeBytes { CRC64.checksum($0) }
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
