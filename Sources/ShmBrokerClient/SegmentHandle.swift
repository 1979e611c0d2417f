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

    /// Reads the latest version block by block in place, handing each block to `consume` right
    /// after verifying it against its checksum: a large version (a camera frame, a tensor) costs
    /// one pass over memory and is never copied. When the writer overtakes the read (possible only
    /// after `slotCount - 1` further publishes), the read starts over at offset 0 on the newer
    /// version: a consumer that accumulates state resets it when it is handed offset 0.
    ///
    /// - Parameter consume: gets each verified block in order (16 KiB, the last may be shorter);
    ///   it must not keep the pointer.
    /// - Returns: the version's number, length, CRC-64 and publish time, or nil if nothing was
    ///   ever published.
    /// - Throws: ``ShmBrokerClientError/segment(_:)`` for a block or version that fails its
    ///   check, or whatever `consume` throws.
    @discardableResult
    public func readBlocks(_ consume: (SegmentReader.VerifiedBlock) throws -> Void) throws -> SegmentReader.CopiedVersion? {
        do {
            return try reader.readBlocks(consume)
        } catch let error as SegmentError {
            throw ShmBrokerClientError.segment(error)
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

    /// Reads the latest version as a plain value (`BitwiseCopyable`) published with
    /// `OwnedSegment.publish(value:)` or ``ShmBrokerClient/publish(_:value:)``, verified.
    ///
    /// - Returns: the version and the value, or nil if nothing was ever published.
    /// - Throws: ``ShmBrokerClientError/protocolViolation(_:)`` if the version's length is not the
    ///   value's size (it holds something else), or a read error as ``read()``.
    public func read<Value: BitwiseCopyable>(_ type: Value.Type) throws(ShmBrokerClientError) -> (version: UInt64, value: Value)? {
        guard let snapshot = try read() else { return nil }
        guard snapshot.bytes.count == MemoryLayout<Value>.size else {
            throw .protocolViolation("version \(snapshot.version) of \(name) holds \(snapshot.bytes.count) bytes, not a \(Value.self) (\(MemoryLayout<Value>.size))")
        }
        return (snapshot.version, snapshot.bytes.withUnsafeBytes { $0.loadUnaligned(as: Value.self) })
    }

    /// Reads the latest version as an array of plain values packed at their stride.
    ///
    /// - Throws: ``ShmBrokerClientError/protocolViolation(_:)`` if the length is not a whole
    ///   number of values.
    public func readArray<Value: BitwiseCopyable>(of type: Value.Type) throws(ShmBrokerClientError) -> (version: UInt64, values: [Value])? {
        guard let snapshot = try read() else { return nil }
        let stride = MemoryLayout<Value>.stride
        guard stride > 0, snapshot.bytes.count % stride == 0 else {
            throw .protocolViolation("version \(snapshot.version) of \(name) holds \(snapshot.bytes.count) bytes, not whole \(Value.self) values (\(stride) each)")
        }
        let values = [Value](unsafeUninitializedCapacity: snapshot.bytes.count / stride) { buffer, count in
            snapshot.bytes.withUnsafeBytes { source in
                UnsafeMutableRawBufferPointer(buffer).copyMemory(from: source)
            }
            count = snapshot.bytes.count / stride
        }
        return (snapshot.version, values)
    }

    /// Whether the daemon has retired the segment (it no longer publishes here).
    public var isRetired: Bool { reader.isRetired }
    /// Whether the segment is a mirror of another host's segment whose source has gone quiet
    /// (`docs/MIRROR.md`): the latest version is readable but may be behind the source's.
    public var isStale: Bool { reader.isStale }
    /// When the owner created this segment's memory (ns since the Unix epoch): kept across an
    /// owner restart through the fd store, new when the segment is created again.
    public var createdAtNanoseconds: UInt64 { reader.createdAtNanoseconds }
}
