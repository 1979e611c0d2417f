import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import Synchronization
import SystemPackage

/// A fast path for a producer that publishes a stream of versions to one segment: a publish ring.
///
/// ``publish(_:timeoutNanoseconds:)-(UnsafeRawBufferPointer,_)`` copies the payload into shared memory that the daemon reads
/// and returns; it does not wait for the daemon, sends no request and passes no descriptor. The
/// daemon is signalled (one `write` to an eventfd) only when it has said it is idle, and it
/// copies entries into the segment — with the CRC, as for every publish — in batches.
/// ``flush(timeoutNanoseconds:)`` waits until everything appended so far is published and returns
/// the latest version. Publish calls block only while the ring is full.
///
/// Calls are serialized. A client has at most one publisher per segment; ``close()`` it when done
/// (one that is dropped is detached in the background). After a daemon
/// restart the client re-attaches the ring by itself and the new daemon publishes whatever the
/// old one had not consumed yet; a publish that was waiting when the connection broke fails with
/// ``ShmBrokerClientError/disconnected``.
public final class SegmentPublisher: Sendable {
    /// The segment this publisher writes to.
    public let segment: String
    /// The largest payload one publish may carry: the segment's capacity (as the daemon last
    /// recorded it in the ring: a reload may resize the segment), within what the ring can hold.
    public var capacity: Int {
        let recorded = ring.segmentCapacity
        return min(recorded > 0 ? recorded : attachedCapacity, ring.maximumPayload)
    }

    /// The capacity the daemon reported when the ring was attached.
    private let attachedCapacity: Int

    let ring: PublishRingProducer
    let ringFile: FileDescriptor
    let doorbell: Doorbell
    private let state = Mutex(State())
    /// Detaches the ring from the daemon (which first publishes what it holds), given the segment
    /// and this publisher's serial number.
    private let detach: @Sendable (String, UInt64) async -> Void
    /// Unique among the publishers of this process (unlike an address, never reused).
    let serialNumber = SegmentPublisher.serialNumbers.add(1, ordering: .relaxed).newValue
    private static let serialNumbers = Atomic<UInt64>(0)

    private struct State {
        var closed = false
        var refusedAtLastFlush: UInt64 = 0
    }

    init(segment: String, capacity: Int, ring: PublishRingProducer, ringFile: FileDescriptor, doorbell: Doorbell,
         detach: @escaping @Sendable (String, UInt64) async -> Void) {
        self.segment = segment
        self.attachedCapacity = capacity
        self.ring = ring
        self.ringFile = ringFile
        self.doorbell = doorbell
        self.detach = detach
    }

    deinit {
        ringFile.closeQuietly()
        doorbell.close()
        // Dropped without close(): detach anyway, so the segment can take a new publisher. The
        // daemon keeps its own mapping until then and publishes what the ring still holds.
        if !state.withLock({ $0.closed }) {
            let (segment, detach, serialNumber) = (self.segment, self.detach, self.serialNumber)
            Task { await detach(segment, serialNumber) }
        }
    }

    /// Creates a ring sized for `capacity` (see ``PublishRingLayout/dataSize(forCapacity:minimum:)``).
    static func makeRing(capacity: Int) throws(ShmBrokerClientError) -> (PublishRingProducer, FileDescriptor, Doorbell) {
        let dataSize = PublishRingLayout.dataSize(forCapacity: capacity)
        do throws(Errno) {
            let file = try MemoryFile.createScratch(name: "shmbroker-ring", sealedAgainstShrinking: true)
            do throws(Errno) {
                try file.setSize(PublishRingLayout.headerSize + dataSize)
                // Every page allocated and mapped before the first publish: no page fault (and
                // no allocation that could fail) on the ring's first lap, in this process or,
                // since the file then has no holes, in the daemon's mapping.
                try MemoryFile.reserve(file, size: PublishRingLayout.headerSize + dataSize)
                let region = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + dataSize, writable: true, populate: true)
                let doorbell = try Doorbell()
                return (PublishRingProducer(formatting: region, dataSize: dataSize), file, doorbell)
            } catch {
                file.closeQuietly()
                throw error
            }
        } catch {
            throw .system(operation: "creating a publish ring", errno: error)
        }
    }

    /// Appends `bytes` as the segment's next version and returns without waiting for the daemon.
    ///
    /// - Parameters:
    ///   - bytes: the payload, at most ``capacity`` bytes.
    ///   - timeoutNanoseconds: the longest wait for room while the ring is full (nil: no limit).
    /// - Throws: `refused(payload-too-large)` for an oversize payload (nothing is appended);
    ///   ``ShmBrokerClientError/timedOut(_:)`` if the ring stayed full; `disconnected` if the
    ///   connection to the daemon broke; `refused` with the daemon's reason if it detached the
    ///   ring (the segment was removed from its config, say), or if the publisher was closed.
    public func publish(_ bytes: UnsafeRawBufferPointer, timeoutNanoseconds: UInt64? = 10_000_000_000) throws(ShmBrokerClientError) {
        let limit = capacity
        guard bytes.count <= limit else {
            throw .refused(ProtocolError(.payloadTooLarge, SegmentError.payloadTooLarge(length: bytes.count, capacity: limit).description))
        }
        let appended = state.withLock { state -> Result<Bool, ShmBrokerClientError> in
            guard !state.closed else { return .failure(Self.closedError) }
            return Result { () throws(PublishRingError) in try ring.append(bytes, timeoutNanoseconds: timeoutNanoseconds) }
                .mapError(Self.clientError)
        }
        if try appended.get() { doorbell.ring() }
    }

    /// Appends `bytes` as the segment's next version; see ``publish(_:timeoutNanoseconds:)-(UnsafeRawBufferPointer,_)``.
    public func publish(_ bytes: [UInt8], timeoutNanoseconds: UInt64? = 10_000_000_000) throws(ShmBrokerClientError) {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(ShmBrokerClientError) in try publish(buffer, timeoutNanoseconds: timeoutNanoseconds) }
        }
        try result.get()
    }

    /// Waits until the daemon has published everything appended so far.
    ///
    /// - Returns: the daemon's results: the latest version, its CRC and length, and counts.
    /// - Throws: `refused` with the daemon's error code if it refused any entry since the last
    ///   flush (the others were published), `timedOut`, `disconnected`, or the detach reason.
    @discardableResult
    public func flush(timeoutNanoseconds: UInt64? = 10_000_000_000) throws(ShmBrokerClientError) -> PublishRingResults {
        let outcome = state.withLock { state -> Result<PublishRingResults, ShmBrokerClientError> in
            guard !state.closed else { return .failure(Self.closedError) }
            let waited = Result { () throws(PublishRingError) in try ring.waitUntilConsumed(timeoutNanoseconds: timeoutNanoseconds) }
                .mapError(Self.clientError)
            guard case .success(let results) = waited else { return waited }
            let newlyRefused = results.refusedEntries - state.refusedAtLastFlush
            state.refusedAtLastFlush = results.refusedEntries
            if newlyRefused > 0 {
                let code = ErrorCode(rawValue: UInt16(truncatingIfNeeded: results.lastRefusalCode)) ?? .internalError
                return .failure(.refused(ProtocolError(code, "the daemon refused \(newlyRefused) of the payloads published since the last flush")))
            }
            return .success(results)
        }
        return try outcome.get()
    }

    /// The daemon's latest results, without waiting.
    public var results: PublishRingResults { ring.results }

    /// Publishes what is still in the ring, detaches it, and releases it. Later calls throw.
    public func close() async {
        let wasOpen = state.withLock { state in
            defer { state.closed = true }
            return !state.closed
        }
        if wasOpen { await detach(segment, serialNumber) }
    }

    static let closedError = ShmBrokerClientError.refused(ProtocolError(.invalidRing, "the publisher was closed"))

    static func clientError(_ error: PublishRingError) -> ShmBrokerClientError {
        switch error {
        case .payloadTooLarge(let length, let maximum):
            return .refused(ProtocolError(.payloadTooLarge, "payload of \(length) bytes exceeds the ring's \(maximum)"))
        case .timedOut:
            return .timedOut("the publish ring stayed full: the daemon is not consuming it")
        case .detached(let code) where code == UInt32(ErrorCode.connectionLost.rawValue):
            return .disconnected
        case .detached(let code):
            let known = ErrorCode(rawValue: UInt16(truncatingIfNeeded: code)) ?? .internalError
            return .refused(ProtocolError(known, "the daemon stopped consuming this publish ring"))
        case .invalidRing(let reason):
            return .protocolViolation(reason)
        }
    }
}
