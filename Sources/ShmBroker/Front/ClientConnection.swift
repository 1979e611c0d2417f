import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// One connected control-channel client, as the event loop tracks it.
final class ClientConnection {
    let id: UInt64
    let socket: FileDescriptor
    let credentials: PeerCredentials
    /// Its registration with the event loop (nil once disconnecting).
    var registration: EventRegistration?
    /// Set by a disconnect: nothing more is read or sent; the loop completes the close at the
    /// end of its turn.
    var isClosing = false
    var name = ""
    var greeted = false
    var opened: Set<String> = []
    var subscriptions: Set<String> = []
    /// The version SUBSCRIBED reported, per segment, until an event passes it: no VERSION event
    /// repeats it (PROTOCOL.md promises events only for later versions).
    var subscribedAt: [String: UInt64] = [:]
    /// Publish rings this client attached, by segment name (values are ring tokens).
    var rings: [String: UInt64] = [:]

    /// Frames (with descriptors to pass) that could not be sent yet, oldest first. While any are
    /// queued, the loop stops reading this client's requests: a client that does not read its
    /// replies gets backpressure, not unbounded memory.
    private(set) var outbound: [(frame: [UInt8], descriptors: [FileDescriptor])] = []
    private var outboundHead = 0
    /// Segments with a version event not yet delivered. Coalesced: one entry per segment, and
    /// the event sent is always for the segment's latest version at sending time.
    private(set) var pendingEvents: [String] = []
    private var pendingEventSet: Set<String> = []
    /// When the socket was first found full with nothing sent since (monotonic ns).
    var stalledSince: UInt64?
    /// Whether the loop currently watches this socket for writability.
    var watchingWritable = false
    /// Read-only mappings of this client's shrink-sealed staging memfds, by inode, so that a
    /// producer reusing its staging files costs no mmap per publish. At most four are kept.
    var stagingMappings: [(inode: UInt64, region: MappedRegion)] = []

    init(id: UInt64, socket: FileDescriptor, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var hasBacklog: Bool { outboundHead < outbound.count || !pendingEvents.isEmpty }
    var hasQueuedReplies: Bool { outboundHead < outbound.count }

    func enqueue(_ frame: [UInt8], descriptors: [FileDescriptor]) {
        outbound.append((frame, descriptors))
    }

    /// The oldest queued frame, if any.
    var firstQueued: (frame: [UInt8], descriptors: [FileDescriptor])? {
        outboundHead < outbound.count ? outbound[outboundHead] : nil
    }

    /// Drops the oldest queued frame after it was sent, closing the descriptors it passed.
    func dequeueSent() {
        outbound[outboundHead].descriptors.forEach { $0.closeQuietly() }
        outboundHead += 1
        if outboundHead == outbound.count {
            outbound.removeAll(keepingCapacity: true)
            outboundHead = 0
        }
    }

    /// Records that `segment` has a newer version to announce.
    /// - Returns: false if an announcement was already pending (the event is coalesced).
    @discardableResult
    func markPending(_ segment: String) -> Bool {
        guard pendingEventSet.insert(segment).inserted else { return false }
        pendingEvents.append(segment)
        return true
    }

    func removePending(_ segment: String) {
        guard pendingEventSet.remove(segment) != nil else { return }
        pendingEvents.removeAll { $0 == segment }
    }

    /// Removes and returns the oldest pending segment.
    func popPending() -> String? {
        guard !pendingEvents.isEmpty else { return nil }
        let segment = pendingEvents.removeFirst()
        pendingEventSet.remove(segment)
        return segment
    }

    /// Puts a segment back at the front after a send found the socket full.
    func pushBackPending(_ segment: String) {
        guard pendingEventSet.insert(segment).inserted else { return }
        pendingEvents.insert(segment, at: 0)
    }

    /// Whether a VERSION event for `version` of `segment` is news to this client: false for a
    /// version SUBSCRIBED already reported (an in-process publish whose announcement raced the
    /// subscription); the first later version lifts the floor.
    func wantsEvent(for segment: String, version: UInt64) -> Bool {
        guard let floor = subscribedAt[segment] else { return true }
        guard version > floor else { return false }
        subscribedAt.removeValue(forKey: segment)
        return true
    }

    /// Closes the socket and every descriptor still queued.
    func close() {
        for entry in outbound[outboundHead...] { entry.descriptors.forEach { $0.closeQuietly() } }
        outbound.removeAll()
        outboundHead = 0
        socket.closeQuietly()
    }
}
