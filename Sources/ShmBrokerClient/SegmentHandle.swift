import ShmBrokerCore
import ShmBrokerPlatform

/// An opened segment: a read-only mapping of its shared memory.
///
/// Reads never talk to the daemon and never block it; they stay valid after the connection
/// closes (the mapping lives as long as this handle).
public final class SegmentHandle: Sendable {
    /// The segment's name.
    public let name: String
    /// The lock-free reader over the mapping.
    public let reader: SegmentReader

    init(name: String, reader: SegmentReader) {
        self.name = name
        self.reader = reader
    }

    /// The segment's capacity in bytes.
    public var capacity: Int { reader.layout.capacity }

    /// The latest version number (0: never published).
    public var latestVersion: UInt64 { reader.latestVersion }

    /// Reads and verifies the latest version.
    ///
    /// - Returns: the content with its version, CRC and publish time, or nil if nothing was ever
    ///   published (an empty payload is a version with no bytes, not nil).
    /// - Throws: ``ShmBrokerClientError/segment(_:)`` with a CRC mismatch (corruption) or if the
    ///   writer kept replacing the version during every attempt.
    public func read() throws(ShmBrokerClientError) -> SegmentSnapshot? {
        do {
            return try reader.read()
        } catch {
            throw .segment(error)
        }
    }

    /// Blocks the calling thread until a version newer than `version` is published, the segment
    /// is retired, or the timeout passes. No socket is involved. Use it from a dedicated thread,
    /// not an async task.
    ///
    /// - Parameters:
    ///   - version: the version the caller already has.
    ///   - timeoutNanoseconds: the longest wait; nil waits indefinitely.
    ///   - strategy: `.futex` (default) sleeps on the segment's futex word, using no CPU while
    ///     waiting; `.spin` busy-polls the version word — the version is seen a cache-line
    ///     transfer after it exists, but a core stays busy (for a reader that owns one);
    ///     `.spinThenFutex(nanoseconds:)` spins for that long, then sleeps.
    /// - Returns: the latest version when it returned.
    public func waitForVersion(after version: UInt64, timeoutNanoseconds: UInt64? = nil,
                               strategy: SegmentReader.WaitStrategy = .futex) -> UInt64 {
        reader.waitForVersion(after: version, timeoutNanoseconds: timeoutNanoseconds, strategy: strategy)
    }

    /// Whether the daemon has retired the segment (it no longer publishes here).
    public var isRetired: Bool { reader.isRetired }
}
