import ShmBrokerCore
import ShmBrokerProtocol

/// Tells a segment's subscribers about each new version with a VERSION event, coalescing for a
/// subscriber whose socket is full (it gets the latest version once it drains). Cost is
/// proportional to this segment's subscribers only.
final class SubscriberFanOut: VersionSink {
    private unowned let server: BrokerServer

    init(server: BrokerServer) { self.server = server }

    func versionCommitted(_ receipt: PublishReceipt, to segment: ManagedSegment, origin: VersionOrigin) {
        segment.lastAnnouncedVersion = receipt.version
        guard !segment.subscribers.isEmpty else { return }
        let version = receipt
        var event: [UInt8]?
        for id in segment.subscribers {
            guard let client = server.clients[id], !client.isClosing,
                  client.wantsEvent(for: segment.name, version: version.version) else { continue }
            if client.hasBacklog {
                if !client.markPending(segment.name) { server.counters[segment: segment.name].eventsCoalesced += 1 }
                continue
            }
            if event == nil {
                event = ServerMessage.versionEvent(segment: segment.name, version).encode(requestID: 0)
            }
            switch server.trySend(event!, to: client) {
            case .sent:
                server.counters[segment: segment.name].eventsSent += 1
            case .full:
                client.markPending(segment.name)
                server.waitForWritable(client)
            case .failed:
                break
            }
        }
    }
}
