import Foundation

/// A heartbeat: every interval, each exporting host says, on core NATS, the latest version of
/// each segment it exports. Importers learn from it that the source is alive and how far
/// behind they are, whether or not a value arrives (a value can be held up, a heartbeat too:
/// one that arrives late never makes a segment fresh).
public struct Heartbeat: Codable, Sendable, Equatable {
    public struct Segment: Codable, Sendable, Equatable {
        /// The source segment's epoch (its `createdAt`).
        public var epoch: UInt64
        /// Its latest version when the heartbeat left.
        public var version: UInt64
        /// False when the exporter cannot reach the segment's owner (it died, or refused): the
        /// versions it knows may not be the latest, so importers mark the segment stale.
        public var available: Bool

        public init(epoch: UInt64, version: UInt64, available: Bool) {
            self.epoch = epoch
            self.version = version
            self.available = available
        }
    }

    public var host: String
    /// When it left, ns since the Unix epoch, by the exporter's clock.
    public var sentAtNanoseconds: UInt64
    public var segments: [String: Segment]

    /// The largest heartbeat accepted (a host exporting a few hundred segments fits).
    public static let maximumSize = 256 * 1024

    public init(host: String, sentAtNanoseconds: UInt64, segments: [String: Segment]) {
        self.host = host
        self.sentAtNanoseconds = sentAtNanoseconds
        self.segments = segments
    }

    public func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return Array((try? encoder.encode(self)) ?? Data())
    }

    /// Reads a heartbeat from the network, which is hostile: size-capped, and it must name the
    /// host whose subject it came on.
    public static func decode(_ bytes: UnsafeRawBufferPointer, expectedHost: String) -> Heartbeat? {
        guard bytes.count <= maximumSize,
              let heartbeat = try? JSONDecoder().decode(Heartbeat.self, from: Data(bytes)),
              heartbeat.host == expectedHost else { return nil }
        return heartbeat
    }
}

/// Whether an imported segment is fresh, from the heartbeats of its source and the local
/// version: stale when no heartbeat was heard for `staleAfter`, when the exporter says it cannot
/// reach the segment, or when the local segment has been behind the source's announced version
/// for `staleAfter`. Only a heartbeat newer than every earlier one counts, and one that left
/// more than `staleAfter` (plus the clock tolerance) ago updates the source's version but does
/// not count as hearing from the source: a late heartbeat never turns a segment fresh.
///
/// A value type with no clock of its own: the caller passes the times, so tests drive it.
public struct Freshness: Sendable, Equatable {
    public let staleAfterNanoseconds: UInt64
    public let clockToleranceNanoseconds: UInt64

    /// The newest heartbeat's send time (source clock).
    public private(set) var newestSentAt: UInt64 = 0
    /// When a timely heartbeat was last heard (local monotonic ns), and its wall time.
    public private(set) var lastHeardAt: UInt64?
    public private(set) var lastHeardWall: Date?
    /// The source segment's epoch and the highest version it announced in that epoch.
    public private(set) var epoch: UInt64?
    public private(set) var sourceVersion: UInt64 = 0
    public private(set) var available = true
    /// The local version, and since when (monotonic, and wall) it has been behind.
    public private(set) var localVersion: UInt64 = 0
    public private(set) var localEpoch: UInt64?
    public private(set) var behindSince: UInt64?
    public private(set) var behindSinceWall: Date?
    /// Since when the segment is stale (wall time); nil when fresh.
    public private(set) var staleSince: Date?
    /// When this tracker started listening (monotonic): with no heartbeat yet, staleness counts
    /// from here.
    public private(set) var startedAt: UInt64

    public init(staleAfterSeconds: Double, clockToleranceSeconds: Double, now: UInt64) {
        staleAfterNanoseconds = UInt64(staleAfterSeconds * 1e9)
        clockToleranceNanoseconds = UInt64(clockToleranceSeconds * 1e9)
        startedAt = now
    }

    /// Takes a heartbeat's word for the segment.
    ///
    /// - Parameters:
    ///   - sentAt: when it left (source clock, ns since the Unix epoch).
    ///   - segment: what it says about this segment.
    ///   - now: local monotonic ns; `wall`: local wall time.
    /// - Returns: false if it was ignored (not newer than the newest already seen).
    @discardableResult
    public mutating func heartbeat(sentAt: UInt64, _ segment: Heartbeat.Segment, now: UInt64, wall: Date) -> Bool {
        guard sentAt > newestSentAt else { return false }
        newestSentAt = sentAt
        if segment.epoch != epoch {
            epoch = segment.epoch
            sourceVersion = segment.version
        } else {
            sourceVersion = max(sourceVersion, segment.version)
        }
        available = segment.available
        let wallNanoseconds = UInt64(max(0, wall.timeIntervalSince1970) * 1e9)
        let age = wallNanoseconds > sentAt ? wallNanoseconds - sentAt : 0
        if age <= staleAfterNanoseconds + clockToleranceNanoseconds {
            lastHeardAt = now
            lastHeardWall = wall
        }
        updateBehind(now: now, wall: wall)
        return true
    }

    /// Starts counting silence from `now`: when the heartbeat subscription is (re)established,
    /// before any heartbeat could have been heard.
    public mutating func listening(since now: UInt64) {
        if lastHeardAt == nil { startedAt = now }
    }

    /// Records the local segment's latest version (after an import, or a renewal).
    public mutating func local(version: UInt64, epoch: UInt64?, now: UInt64, wall: Date) {
        localVersion = version
        localEpoch = epoch
        updateBehind(now: now, wall: wall)
    }

    private mutating func updateBehind(now: UInt64, wall: Date) {
        // Behind: the source has a version (in its current epoch) that is not served here yet.
        let behind = epoch != nil && sourceVersion > 0 && (localEpoch != epoch || localVersion < sourceVersion)
        if behind, behindSince == nil {
            behindSince = now
            behindSinceWall = wall
        } else if !behind {
            behindSince = nil
            behindSinceWall = nil
        }
    }

    /// Why the segment is stale, if it is (the log and the metrics say it).
    public private(set) var reason: String?

    /// Decides staleness at `now`. A stale segment turns fresh only once it hears timely
    /// heartbeats and has been behind the source's announced version for less than half the
    /// bound (caught up, or nearly): a link that heals does not make a segment that is still far
    /// behind look fresh for a moment.
    /// Returns true when it changed.
    @discardableResult
    public mutating func evaluate(now: UInt64, wall: Date) -> Bool {
        let silentSince = lastHeardAt ?? startedAt
        let silent = now &- silentSince > staleAfterNanoseconds
        let lagging = behindSince.map { now &- $0 > staleAfterNanoseconds } ?? false
        let catchingUp = staleSince != nil && behindSince.map { now &- $0 >= staleAfterNanoseconds / 2 } ?? false
        reason = silent ? (lastHeardAt == nil ? "no heartbeat yet" : "no heartbeat for \(String(format: "%.2f", Double(now &- silentSince) / 1e9)) s")
            : !available ? "the source's mirror cannot reach the segment's owner"
            : lagging ? "behind the source for \(String(format: "%.2f", Double(now &- behindSince!) / 1e9)) s"
            : catchingUp ? "catching up with the source" : nil
        let stale = reason != nil
        if stale, staleSince == nil {
            staleSince = wall
            return true
        }
        if !stale, staleSince != nil {
            staleSince = nil
            return true
        }
        return false
    }

    public var isStale: Bool { staleSince != nil }
}
