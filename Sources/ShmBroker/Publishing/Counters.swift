import ShmBrokerProtocol

/// What happened to one segment, counted since the owner started (a resized segment keeps its
/// counts: they are kept by name).
struct SegmentCounts: Equatable {
    /// Versions clients published (requests and rings).
    var publishes: UInt64 = 0
    var publishedBytes: UInt64 = 0
    var eventsSent: UInt64 = 0
    var eventsCoalesced: UInt64 = 0
    var slowSubscribersDropped: UInt64 = 0
}

/// The owner's one store of counts, kept on the event loop. STATUS (``statusView(visible:owned:)``)
/// and the Prometheus metrics (``BrokerMetrics/refresh(segments:clients:accepted:refused:)``) are
/// views of it; the embedding application's own publishes are counted on its threads by
/// ``OwnedSegment`` and added in the views.
final class Counters {
    var clientsAccepted: UInt64 = 0
    var clientsRefused: UInt64 = 0
    var slowSubscribersDisconnected: UInt64 = 0
    var malformedRequests: UInt64 = 0
    var errorReplies: UInt64 = 0
    var reloads: UInt64 = 0
    var failedReloads: UInt64 = 0
    var descriptorLimitRefusals: UInt64 = 0
    /// Per segment, by name.
    private(set) var segments: [String: SegmentCounts] = [:]

    /// The counts of one segment (zeros if nothing happened to it yet).
    subscript(segment name: String) -> SegmentCounts {
        get { segments[name] ?? SegmentCounts() }
        set { segments[name] = newValue }
    }

    /// A client published `length` bytes to `segment`.
    func published(_ length: Int, to segment: String) {
        self[segment: segment].publishes &+= 1
        self[segment: segment].publishedBytes &+= UInt64(length)
    }

    /// The counters as STATUS reports them: the segments' counts summed over `visible` (nil:
    /// every segment, retired ones included), plus `owned`, the application's own publishes.
    func statusView(visible: Set<String>?, owned: [OwnedSegment]) -> StatusReport.Counters {
        var view = StatusReport.Counters()
        view.clientsAccepted = clientsAccepted
        view.clientsRefused = clientsRefused
        view.malformedRequests = malformedRequests
        view.errorReplies = errorReplies
        view.reloads = reloads
        view.failedReloads = failedReloads
        view.descriptorLimitRefusals = descriptorLimitRefusals
        view.slowSubscribersDisconnected = slowSubscribersDisconnected
        let shown = segments.filter { visible?.contains($0.key) ?? true }.values
        view.publishes = shown.reduce(0) { $0 &+ $1.publishes }
            &+ owned.filter { visible?.contains($0.name) ?? true }.reduce(0) { $0 &+ $1.publishCount }
        view.eventsSent = shown.reduce(0) { $0 &+ $1.eventsSent }
        view.eventsCoalesced = shown.reduce(0) { $0 &+ $1.eventsCoalesced }
        if visible != nil { view.slowSubscribersDisconnected = shown.reduce(0) { $0 &+ $1.slowSubscribersDropped } }
        return view
    }
}
