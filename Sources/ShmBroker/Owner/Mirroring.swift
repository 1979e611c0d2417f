import Foundation
import ShmBrokerCore
import ShmBrokerProtocol

/// What an owner that mirrors another host's segment (`shmbroker-mirror`) knows about its source:
/// STATUS reports it, the segment header's `stale` flag follows it, and subscribers get a
/// STALENESS event each time it turns stale or fresh. See `docs/MIRROR.md`.
public struct MirrorState: Sendable, Equatable {
    /// The host and segment the versions come from.
    public var sourceHost: String
    public var sourceSegment: String
    /// The source segment's epoch (its creation time, ns): it changes when the source is recreated.
    public var sourceEpoch: UInt64
    /// The highest version the source announced.
    public var sourceVersion: UInt64
    /// Since when the local segment has been behind `sourceVersion`; nil when caught up.
    public var behindSince: Date?
    /// Since when the segment is stale; nil when fresh.
    public var staleSince: Date?
    /// The last heartbeat heard from the source; nil if none yet.
    public var lastHeartbeatAt: Date?

    /// - Parameters:
    ///   - sourceHost: the exporting host's name.
    ///   - sourceSegment: the segment's name there.
    ///   - sourceEpoch: the source segment's epoch.
    ///   - sourceVersion: the highest version the source announced.
    ///   - behindSince: since when the local segment is behind; nil when caught up.
    ///   - staleSince: since when it is stale; nil when fresh.
    ///   - lastHeartbeatAt: the last heartbeat heard; nil if none yet.
    public init(sourceHost: String, sourceSegment: String, sourceEpoch: UInt64, sourceVersion: UInt64,
                behindSince: Date? = nil, staleSince: Date? = nil, lastHeartbeatAt: Date? = nil) {
        self.sourceHost = sourceHost
        self.sourceSegment = sourceSegment
        self.sourceEpoch = sourceEpoch
        self.sourceVersion = sourceVersion
        self.behindSince = behindSince
        self.staleSince = staleSince
        self.lastHeartbeatAt = lastHeartbeatAt
    }

    /// Whether the segment is stale.
    public var isStale: Bool { staleSince != nil }

    /// STATUS's view, for a local segment at `localVersion`, at time `now`.
    func report(localVersion: UInt64, now: Date) -> StatusReport.Mirror {
        StatusReport.Mirror(
            sourceHost: sourceHost, sourceSegment: sourceSegment, sourceEpoch: sourceEpoch, sourceVersion: sourceVersion,
            lagVersions: sourceVersion > localVersion ? sourceVersion - localVersion : 0,
            lagSeconds: behindSince.map { max(0, now.timeIntervalSince($0)) } ?? 0,
            stale: isStale, staleSince: staleSince?.timeIntervalSince1970, lastHeartbeatAt: lastHeartbeatAt?.timeIntervalSince1970)
    }
}

extension OwnedSegment {
    /// Publishes `bytes` under a version number the caller chose, which must be greater than the
    /// latest (gaps are allowed): how a mirror serves a remote segment's versions with the
    /// source's own numbers, so that readers on every host see the same numbers for the same
    /// bytes and never a number that goes backwards. The content must match `expectedCRC`,
    /// checked as it is copied, before anything becomes visible.
    ///
    /// - Parameters:
    ///   - bytes: the content.
    ///   - version: its number; later plain publishes continue from it.
    ///   - expectedCRC: the CRC-64/XZ the source computed.
    ///   - publishedAtNanoseconds: the source's publish time, ns since the Unix epoch.
    /// - Returns: the new version's receipt.
    /// - Throws: ``OwnerError/versionNotAfterLatest(segment:version:latest:)``,
    ///   ``OwnerError/checksumMismatch(segment:version:)``,
    ///   ``OwnerError/payloadTooLarge(segment:length:capacity:)`` (in each case nothing was
    ///   written), ``OwnerError/retired(_:)``, ``OwnerError/concurrentPublish(_:)``.
    @discardableResult
    public func publish(_ bytes: UnsafeRawBufferPointer, atVersion version: UInt64, expectedCRC: UInt64,
                        publishedAtNanoseconds: UInt64) throws(OwnerError) -> PublishReceipt {
        let writer = try enter()
        defer { leave() }
        let outcome = writer._withUnsafeGuaranteedRef { writer -> Result<PublishReceipt, OwnerError> in
            do throws(SegmentError) {
                return .success(try writer.publish(bytes, atVersion: version, expectedCRC: expectedCRC,
                                                   publishedAtNanoseconds: publishedAtNanoseconds))
            } catch {
                switch error {
                case let .versionNotAfterLatest(version, latest):
                    return .failure(.versionNotAfterLatest(segment: name, version: version, latest: latest))
                case .checksumMismatch:
                    return .failure(.checksumMismatch(segment: name, version: version))
                default:
                    return .failure(.payloadTooLarge(segment: name, length: bytes.count, capacity: writer.layout.capacity))
                }
            }
        }
        let receipt = try outcome.get()
        announce(length: receipt.length)
        return receipt
    }
}

extension ShmBrokerOwner {
    /// Reports where a claimed segment's versions come from and whether it is stale. The
    /// header's `stale` flag is raised or cleared at once; subscribers get a STALENESS event
    /// when it changes; STATUS shows the rest. Returns when the event loop has applied it.
    ///
    /// - Parameters:
    ///   - name: a segment this owner claimed with ``segment(_:)``.
    ///   - state: the source, its latest version and the freshness.
    /// - Throws: ``OwnerError/noSuchSegment(_:)`` if the segment is not claimed and served.
    public func updateMirror(_ name: String, _ state: MirrorState) throws(OwnerError) {
        if let failure = server.submit({ $0.updateMirror(name, state) }) { throw failure }
    }

    /// Starts a claimed segment over: its memory is retired (readers see `retired` and a RETIRED
    /// event, as for a segment a reload removed, and open it again) and a fresh segment of the
    /// same definition takes its place, at version 0, published through the same handle. A
    /// mirror does this when its source was recreated (a new epoch).
    ///
    /// - Parameter name: a segment this owner claimed with ``segment(_:)``.
    /// - Throws: ``OwnerError/noSuchSegment(_:)``, or ``OwnerError/startFailed(_:)`` if the
    ///   new memory cannot be created (the old segment then stays).
    public func renew(_ name: String) throws(OwnerError) {
        if let failure = server.submit({ $0.renew(name) }) { throw failure }
    }
}

extension BrokerServer {
    // MARK: Mirrored segments

    func updateMirror(_ name: String, _ state: MirrorState) -> OwnerError? {
        loop.assertOnLoop()
        guard let segment = segments[name], segment.owner != nil else { return .noSuchSegment(name) }
        let wasStale = segment.writer.isStale
        segment.mirror = state
        guard wasStale != state.isStale else { return nil }
        segment.writer.setStale(state.isStale)
        logger.notice(state.isStale ? "mirrored segment is stale" : "mirrored segment is fresh again", metadata: [
            "segment": "\(name)", "sourceHost": "\(state.sourceHost)", "sourceVersion": "\(state.sourceVersion)",
            "localVersion": "\(segment.writer.latestVersion)",
        ])
        let changedAt = state.staleSince ?? Date()
        let event = ServerMessage.stalenessEvent(segment: name, stale: state.isStale,
                                                 changedAtNanoseconds: UInt64(max(0, changedAt.timeIntervalSince1970) * 1e9)).encode(requestID: 0)
        for id in segment.subscribers {
            guard let client = clients[id], !client.isClosing else { continue }
            send(event, to: client)
        }
        return nil
    }

    func renew(_ name: String) -> OwnerError? {
        loop.assertOnLoop()
        guard let old = segments[name], let owned = old.owner else { return .noSuchSegment(name) }
        let segment: ManagedSegment
        do {
            try MemoryBudget.check([old.definition])
            segment = try ManagedSegment(creating: old.definition)
        } catch {
            return .startFailed("cannot create a new segment \"\(name)\": \(error)")
        }
        owned.exclusively { owned.bind(writer: segment.writer, signals: segment.signals) }
        segment.owner = owned
        segment.mirror = old.mirror
        if old.writer.isStale { segment.writer.setStale(true) }
        old.owner = nil
        logger.notice("segment started over (its source was recreated)", metadata: ["segment": "\(name)"])
        retireSegment(named: name)
        addSegment(segment)
        storeInSystemd(segment)
        return nil
    }
}
