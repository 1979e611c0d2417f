import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The embedding owner's side of the server: claiming a segment for in-process publishing, and
/// announcing the versions the application published.
extension BrokerServer {
    // MARK: The embedding owner

    /// Makes `owned` the only writer of its segment (on the loop's thread, or before it runs).
    /// What clients' rings still hold is published first; then they are detached.
    func claim(_ owned: OwnedSegment) -> OwnerError? {
        loop.assertOnLoop()
        guard let segment = segments[owned.name] else { return .noSuchSegment(owned.name) }
        if segment.owner === owned { return nil }
        for ring in Array(rings.values) where ring.segmentName == owned.name {
            finalDrain(ring)
            removeRing(ring, detachCode: .ownerPublishes)
        }
        owned.exclusively { owned.bind(writer: segment.writer, signals: segment.signals) }
        segment.owner = owned
        segment.lastAnnouncedVersion = segment.writer.latestVersion
        segments.recordClaim(owned)
        logger.info("segment published by the owner process", metadata: ["segment": "\(owned.name)"])
        return nil
    }

    /// Runs `body` on the loop's thread and returns its result; from any other thread. If the
    /// loop is not running (stopped, or not yet started), `body` runs on the calling thread.


    /// Delivers the versions the application published in-process to the pipeline's sinks: for
    /// segments it flagged (`onlyPending`: it flags those with subscribers), or, from the timer,
    /// for any whose latest version was not yet delivered (a publish that raced a new
    /// subscription, or a persistent segment without subscribers).
    func announceOwnedSegments(onlyPending: Bool) {
        loop.assertOnLoop()
        for owned in segments.owned {
            guard let segment = segments[owned.name], segment.owner === owned else { continue }
            let flagged = segment.signals.announcePending.exchange(false, ordering: .acquiringAndReleasing)
            guard flagged || !onlyPending, !segment.subscribers.isEmpty || segment.definition.persists,
                  let receipt = segment.writer.latestReceipt, receipt.version > segment.lastAnnouncedVersion else { continue }
            pipeline.deliver(receipt, of: segment, origin: .owner)
        }
    }

}
