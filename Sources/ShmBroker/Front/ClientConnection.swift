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

    /// What is waiting to be sent, and whether the socket is stalled.
    private var queue = OutboundQueue()
    /// Read-only mappings of this client's shrink-sealed staging memfds, by inode, so that a
    /// producer reusing its staging files costs no mmap per publish. At most four are kept.
    var stagingMappings: [(inode: UInt64, region: MappedRegion)] = []

    init(id: UInt64, socket: FileDescriptor, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var hasBacklog: Bool { queue.hasBacklog }
    var hasQueuedReplies: Bool { queue.hasQueuedFrames }
    /// When the socket was first found full with nothing sent since (monotonic ns).
    var stalledSince: UInt64? {
        get { queue.stalledSince }
        set { queue.stalledSince = newValue }
    }
    /// Whether the loop currently watches this socket for writability.
    var watchingWritable: Bool {
        get { queue.watchingWritable }
        set { queue.watchingWritable = newValue }
    }

    func enqueue(_ frame: [UInt8], descriptors: [FileDescriptor]) { queue.enqueue(frame, descriptors: descriptors) }
    /// The oldest queued frame, if any.
    var firstQueued: (frame: [UInt8], descriptors: [FileDescriptor])? { queue.first }
    /// Drops the oldest queued frame after it was sent, closing the descriptors it passed.
    func dequeueSent() { queue.dequeueSent() }
    /// Records that `segment` has a newer version to announce.
    /// - Returns: false if an announcement was already pending (the event is coalesced).
    @discardableResult
    func markPending(_ segment: String) -> Bool { queue.markPending(segment) }
    func removePending(_ segment: String) { queue.removePending(segment) }
    /// Removes and returns the oldest pending segment.
    func popPending() -> String? { queue.popPending() }
    /// Puts a segment back at the front after a send found the socket full.
    func pushBackPending(_ segment: String) { queue.pushBackPending(segment) }

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
        queue.closeAll()
        socket.closeQuietly()
    }
}

/// A client's outbound side: frames (with descriptors to pass) that could not be sent yet, oldest
/// first, and the segments with a VERSION event not yet delivered. While frames are queued, the
/// loop stops reading the client's requests: a client that does not read its replies gets
/// backpressure, not unbounded memory. Events are coalesced: one entry per segment, and the event
/// sent is always for the segment's latest version at sending time.
struct OutboundQueue {
    private var frames: [(frame: [UInt8], descriptors: [FileDescriptor])] = []
    private var head = 0
    private var pending: [String] = []
    private var pendingSet: Set<String> = []
    /// When the socket was first found full with nothing sent since (monotonic ns).
    var stalledSince: UInt64?
    /// Whether the loop watches the socket for writability.
    var watchingWritable = false

    var hasQueuedFrames: Bool { head < frames.count }
    var hasBacklog: Bool { hasQueuedFrames || !pending.isEmpty }
    var first: (frame: [UInt8], descriptors: [FileDescriptor])? { hasQueuedFrames ? frames[head] : nil }

    mutating func enqueue(_ frame: [UInt8], descriptors: [FileDescriptor]) {
        frames.append((frame, descriptors))
    }

    mutating func dequeueSent() {
        frames[head].descriptors.forEach { $0.closeQuietly() }
        head += 1
        if head == frames.count {
            frames.removeAll(keepingCapacity: true)
            head = 0
        }
    }

    mutating func markPending(_ segment: String) -> Bool {
        guard pendingSet.insert(segment).inserted else { return false }
        pending.append(segment)
        return true
    }

    mutating func removePending(_ segment: String) {
        guard pendingSet.remove(segment) != nil else { return }
        pending.removeAll { $0 == segment }
    }

    mutating func popPending() -> String? {
        guard !pending.isEmpty else { return nil }
        let segment = pending.removeFirst()
        pendingSet.remove(segment)
        return segment
    }

    mutating func pushBackPending(_ segment: String) {
        guard pendingSet.insert(segment).inserted else { return }
        pending.insert(segment, at: 0)
    }

    /// Closes every descriptor still queued and forgets the frames.
    mutating func closeAll() {
        for entry in frames[head...] { entry.descriptors.forEach { $0.closeQuietly() } }
        frames.removeAll()
        head = 0
    }
}
