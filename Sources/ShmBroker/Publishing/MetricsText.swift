import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The metrics as text: for METRICS requests and the node_exporter textfile.
extension BrokerServer {
    /// the collector never reads half a file and nothing planted in the directory is followed.
    /// A file every user may read holds only what every user may see.
    ///
    /// - Parameter failedBefore: whether the last write failed; a failure is logged once per
    ///   streak, and the first success after one says so.
    func writeMetricsTextfile(failedBefore: inout Bool) {
        loop.assertOnLoop()
        guard let path = configuration.metrics.textfile else { return }
        let settings = configuration.metrics
        let text = metricsText(visibleSegments: settings.textfileIsPublic
            ? Set(segments.values.filter { $0.definition.readers.everyone }.map(\.name)) : nil)
        do throws(FileSystemError) {
            // Anyone who may write the directory could replace the file: refuse a directory
            // every user may write (unless sticky, like /tmp).
            try FileSystem.checkTrustedDirectory(FileSystem.split(path).directory, owners: nil, groupMayWrite: true,
                                                 stickyMayBeShared: true)
            try FileSystem.replace(path, with: [Array(text.utf8)], permissions: mode_t(settings.textfileMode), durable: false)
            if failedBefore { logger.notice("the metrics textfile is written again", metadata: ["path": "\(path)"]) }
            failedBefore = false
        } catch {
            if !failedBefore {  // once per failure streak, not every few seconds
                logger.error("cannot write the metrics textfile", metadata: ["path": "\(path)", "error": "\(error)"])
            }
            failedBefore = true
        }
    }

    /// The metrics in the Prometheus text format, brought up to date first.
    func metricsText(visibleSegments: Set<String>?) -> String {
        loop.assertOnLoop()
        metrics.refresh(segments: segments.ordered.map { segment in
            let counts = counters[segment: segment.name]
            return BrokerMetrics.SegmentFigures(
                name: segment.name, publishes: counts.publishes &+ (segment.owner?.publishCount ?? 0),
                bytes: counts.publishedBytes &+ (segment.owner?.publishedBytes ?? 0), version: segment.writer.latestVersion,
                readers: segment.readers.count, subscribers: segment.subscribers.count, eventsSent: counts.eventsSent,
                eventsCoalesced: counts.eventsCoalesced, slowDropped: counts.slowSubscribersDropped)
        }, clients: clients.count, accepted: counters.clientsAccepted, refused: counters.clientsRefused)
        return metrics.text(visibleSegments: visibleSegments)
    }

    /// Publishes through the control channel and rings, plus the embedding application's own.
    var totalPublishes: UInt64 {
        counters.statusView(visible: nil, owned: segments.owned).publishes
    }
}
