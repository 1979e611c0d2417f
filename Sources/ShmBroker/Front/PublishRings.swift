import Foundation
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// A producer's publish ring attached to one segment: its mapping and its doorbell, watched by
/// the event loop under its own token.
final class AttachedRing {
    let token: UInt64
    /// The doorbell's registration with the event loop.
    var registration: EventRegistration?
    let clientID: UInt64
    let segmentName: String
    let consumer: PublishRingConsumer
    let doorbell: FileDescriptor
    /// Whether the ring is in the loop's list of rings with entries left after a drain.
    var isActive = false

    init(token: UInt64, clientID: UInt64, segmentName: String, consumer: PublishRingConsumer, doorbell: FileDescriptor) {
        self.token = token
        self.clientID = clientID
        self.segmentName = segmentName
        self.consumer = consumer
        self.doorbell = doorbell
    }
}

/// Publish rings: producers append payloads to shared memory and ring an eventfd only when the
/// daemon said it was idle; the loop copies entries into segments in batches, with no request,
/// reply or descriptor per version. See `docs/LAYOUT.md` ("Publish rings").
extension BrokerServer {
    /// Entries consumed from one ring before the loop looks at everything else again.
    static let ringBatch = 32
    /// The largest ring file accepted beyond what a segment's capacity needs.
    static let maximumRingFileSize = 1 << 30

    /// ATTACH_RING: maps the producer's ring and watches its doorbell; the ring's first drain
    /// (entries appended before or while attaching, e.g. by a producer whose daemon restarted)
    /// runs once the reply is on its way.
    func attachRing(file: FileDescriptor, doorbell: FileDescriptor, to segment: ManagedSegment,
                    for client: ClientConnection) throws(ProtocolError) -> Reply {
        defer { file.closeQuietly() }  // the mapping keeps the memory
        guard client.rings[segment.name] == nil else {
            doorbell.closeQuietly()
            throw ProtocolError(.invalidRing, "a publish ring is already attached to \"\(segment.name)\" on this connection; send DETACH_RING first")
        }
        let consumer: PublishRingConsumer
        do throws(ProtocolError) {
            consumer = try mapRing(file, capacity: segment.writer.layout.capacity)
            guard Doorbell.isEventFD(doorbell) else {
                throw ProtocolError(.badDescriptor, "the second descriptor of ATTACH_RING must be an eventfd (the ring's doorbell)")
            }
        } catch {
            doorbell.closeQuietly()
            throw error
        }
        consumer.recordSegmentCapacity(segment.writer.layout.capacity)
        let ring = AttachedRing(token: rings.takeID(), clientID: client.id, segmentName: segment.name, consumer: consumer, doorbell: doorbell)
        do {
            ring.registration = try loop.register(doorbell, events: [.readable, .edgeTriggered], source: CallbackSource { [unowned self, unowned ring] _ in
                self.handleDoorbell(ring)
            })
        } catch {
            doorbell.closeQuietly()
            throw ProtocolError(.internalError, "cannot watch the doorbell: \(error)")
        }
        rings.add(ring)
        metrics.ringAttached()
        client.rings[segment.name] = ring.token
        return Reply(message: .ringAttached(capacity: UInt64(segment.writer.layout.capacity), latestVersion: segment.writer.latestVersion),
                     afterSending: { [unowned self] in self.drain(ring) })
    }

    /// Maps a producer's ring file after checking that it is one: a shrink-sealed regular file
    /// (no SIGBUS while mapped) of a sensible size holding a valid ring header.
    func mapRing(_ file: FileDescriptor, capacity: Int) throws(ProtocolError) -> PublishRingConsumer {
        let size: Int
        do {
            guard try file.isRegularFile() else {
                throw ProtocolError(.badDescriptor, "the first descriptor of ATTACH_RING must be a memfd")
            }
            size = try file.fileSize()
        } catch let error as ProtocolError {
            throw error
        } catch {
            throw ProtocolError(.badDescriptor, "cannot inspect the ring file: \(error)")
        }
        guard let seals = try? MemoryFile.seals(of: file), seals.contains(.shrink) else {
            throw ProtocolError(.invalidRing, "the ring memfd must be sealed against shrinking (F_SEAL_SHRINK)")
        }
        let limit = PublishRingLayout.headerSize + max(Self.maximumRingFileSize, 4 * PublishRingLayout.dataSize(forCapacity: capacity))
        guard size > PublishRingLayout.headerSize, size <= limit else {
            throw ProtocolError(.invalidRing, "the ring file holds \(size) bytes; it must hold more than the \(PublishRingLayout.headerSize)-byte header and at most \(limit)")
        }
        let region: MappedRegion
        do {
            // Prefaulted when the producer allocated every page (as SegmentPublisher does), so
            // the ring's first lap costs the loop no page faults; a sparse file is not populated,
            // which would allocate its holes on the daemon's account.
            region = try MappedRegion(mapping: file, length: size, writable: true,
                                      populate: MemoryFile.isFullyAllocated(file, size: size))
        } catch {
            throw ProtocolError(.badDescriptor, "cannot map the ring file read-write: \(error)")
        }
        do {
            return try PublishRingConsumer(region: region)
        } catch {
            throw ProtocolError(.invalidRing, error.description)
        }
    }

    /// DETACH_RING: what was appended before it is published (as a producer expects), then the
    /// ring is dropped.
    func detachRing(_ name: String, for client: ClientConnection) throws(ProtocolError) -> Reply {
        guard let token = client.rings[name], let ring = rings[token] else {
            throw ProtocolError(.invalidRing, "no publish ring is attached to \"\(name)\" on this connection")
        }
        finalDrain(ring)
        removeRing(ring, detachCode: nil)
        return Reply(message: .ok)
    }

    /// The doorbell rang: the producer appended while the ring was idle.
    func handleDoorbell(_ ring: AttachedRing) {
        loop.assertOnLoop()
        guard rings[ring.token] === ring else { return }
        ring.consumer.markAwake()
        drain(ring)
    }

    /// Consumes one batch from each ring that still had entries after its last batch.
    func drainActiveRings() {
        for ring in rings.takeActive() { drain(ring) }
    }

    /// The segment a ring feeds, if it may still: else the ring is detached with the reason. Also
    /// records the segment's capacity in the ring, for the producer (a reload may resize it).
    func currentSegment(of ring: AttachedRing) -> ManagedSegment? {
        guard let client = clients[ring.clientID] else {
            removeRing(ring, detachCode: nil)
            return nil
        }
        guard let segment = segments[ring.segmentName] else {
            removeRing(ring, detachCode: .segmentRetired)
            return nil
        }
        guard segment.definition.publishers.allows(client.credentials, daemonUID: daemonUID) else {
            removeRing(ring, detachCode: .permissionDenied)
            return nil
        }
        guard segment.owner == nil else {
            removeRing(ring, detachCode: .ownerPublishes)
            return nil
        }
        ring.consumer.recordSegmentCapacity(segment.writer.layout.capacity)
        return segment
    }

    /// Consumes one batch of a ring into its segment; a ring whose producer broke its rules, whose
    /// segment is gone or whose producer may no longer publish is detached with the reason.
    func drain(_ ring: AttachedRing, maximumEntries: Int = BrokerServer.ringBatch) {
        guard let segment = currentSegment(of: ring) else { return }
        var delivered = false
        let outcome = ring.consumer.drain(maximumEntries: maximumEntries, staysAwake: rings.isSpinning) { payload in
            delivered = true
            do throws(ProtocolError) {
                return .success(try pipeline.commit(to: segment, origin: .ring) { try $0.publish(payload) })
            } catch {
                counters.errorReplies += 1  // the ring's answer to this entry, as an ERROR is to a PUBLISH
                return .failure(RingRefusal(code: UInt32(error.code.rawValue)))
            }
        }
        if delivered && configuration.publishRings.spinMicroseconds > 0 { rings.lastEntryAt = Clock.monotonicNanoseconds() }
        switch outcome {
        case .idle:
            break
        case .more:
            rings.markActive(ring)
        case .broken(let reason):
            logger.notice("publish ring broke its rules; detached", metadata: [
                "segment": "\(ring.segmentName)", "client": "\(ring.clientID)",
                "pid": "\(clients[ring.clientID]?.credentials.pid ?? 0)", "reason": "\(reason)",
            ])
            counters.malformedRequests += 1
            removeRing(ring, detachCode: .invalidRing)
        }
    }

    /// "A core for latency" (`publishRings.spinMicroseconds`): for that long after a ring last
    /// delivered an entry, the loop polls every ring on each turn instead of sleeping in
    /// `epoll_wait`, and leaves the rings' idle flags clear, so producers append without ringing
    /// their doorbells and the next version is published with no wake-up at either end. When the
    /// window closes, each ring is drained once more the usual way (idle flag set, head
    /// re-checked), so an entry appended at that moment still rings the doorbell.
    ///
    /// - Returns: whether the loop should look again at once (it is spinning).
    func spinOnRings() -> Bool {
        let window = UInt64(configuration.publishRings.spinMicroseconds) * 1000
        guard window > 0 || rings.isSpinning, !rings.isEmpty else {
            rings.isSpinning = false
            return false
        }
        if Clock.monotonicNanoseconds() &- rings.lastEntryAt < window {
            rings.isSpinning = true
            for ring in Array(rings.values) {
                ring.consumer.markAwake()
                drain(ring)
            }
            return true
        }
        guard rings.isSpinning else { return false }
        rings.isSpinning = false
        for ring in Array(rings.values) { drain(ring) }
        return Clock.monotonicNanoseconds() &- rings.lastEntryAt < window
    }

    /// Publishes everything the ring holds before it is dropped: at most one ring's worth of
    /// entries, so a producer that keeps appending cannot hold the loop.
    func finalDrain(_ ring: AttachedRing) {
        drain(ring, maximumEntries: ring.consumer.capacityInEntries + 1)
    }

    /// Stops consuming a ring, telling its producer why (in the ring) when `detachCode` is set.
    func removeRing(_ ring: AttachedRing, detachCode: ErrorCode?) {
        metrics.ringDetached(reason: detachCode?.name ?? "producer")
        if let detachCode { ring.consumer.detach(code: UInt32(detachCode.rawValue)) }
        if let registration = ring.registration { loop.deregister(registration) }
        ring.registration = nil
        ring.doorbell.closeQuietly()
        rings.remove(ring)
        clients[ring.clientID]?.rings.removeValue(forKey: ring.segmentName)
    }
}
