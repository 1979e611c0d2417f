import ShmBrokerCore
import ShmBrokerProtocol

/// How a version reached its segment.
enum VersionOrigin: Sendable, Equatable {
    /// A client's PUBLISH request.
    case request
    /// An entry of a client's publish ring.
    case ring
    /// The embedding application, on its own thread (``OwnedSegment``).
    case owner
    /// A reload that resized the segment and carried its last version over.
    case carryOver
}

/// A consumer of committed versions: subscriber fan-out, counters, … Each is a type of its own,
/// registered once with the ``PublishPipeline``; it runs on the event loop's thread.
protocol VersionSink: AnyObject {
    /// Called once for each version the loop committed, and for the latest version of a burst
    /// the embedding application published (``VersionOrigin/owner``).
    func versionCommitted(_ receipt: PublishReceipt, to segment: ManagedSegment, origin: VersionOrigin)
}

/// The one place a version is committed: every way a version arrives (a PUBLISH request, a
/// publish ring, a reload's carry-over) ends in ``commit(to:origin:_:)``, which writes it, turns
/// a refusal into the protocol's error, and hands the receipt to the registered sinks. A version
/// the embedding application wrote on its own thread (where the futex wake also happens) reaches
/// the sinks through ``deliver(_:of:origin:)``.
final class PublishPipeline {
    private var sinks: [any VersionSink] = []

    /// Adds a consumer of versions; sinks run in the order they were registered.
    func register(_ sink: any VersionSink) {
        sinks.append(sink)
    }

    /// Writes a version into `segment` with `write` (which calls one of the writer's publish
    /// methods) and delivers its receipt.
    ///
    /// - Throws: the `ProtocolError` a client is answered with: `payload-too-large` when the
    ///   writer refused the length, the fill's own error, or `internal-error`.
    @discardableResult
    func commit(to segment: ManagedSegment, origin: VersionOrigin,
                _ write: (SegmentWriter) throws -> PublishReceipt) throws(ProtocolError) -> PublishReceipt {
        let receipt: PublishReceipt
        do {
            receipt = try write(segment.writer)
        } catch let error as ProtocolError {
            throw error
        } catch let error as SegmentError {
            throw ProtocolError(.payloadTooLarge, error.description)
        } catch {
            throw ProtocolError(.internalError, "\(error)")
        }
        deliver(receipt, of: segment, origin: origin)
        return receipt
    }

    /// Hands a committed version to every sink.
    func deliver(_ receipt: PublishReceipt, of segment: ManagedSegment, origin: VersionOrigin) {
        for sink in sinks { sink.versionCommitted(receipt, to: segment, origin: origin) }
    }
}

/// Counts the versions clients published (requests and rings), per segment and in all; the
/// embedding application's publishes are counted on its own thread by ``OwnedSegment``.
final class PublishCounting: VersionSink {
    private let counters: Counters

    init(counters: Counters) { self.counters = counters }

    func versionCommitted(_ receipt: PublishReceipt, to segment: ManagedSegment, origin: VersionOrigin) {
        guard origin == .request || origin == .ring else { return }
        counters.published(receipt.length, to: segment.name)
    }
}
