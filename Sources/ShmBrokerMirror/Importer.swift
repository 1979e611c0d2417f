import Atomics
import Foundation
import Logging
import ShmBroker
import ShmBrokerCore
import ShmBrokerPlatform
import Synchronization

/// The import side: for each imported segment a thread that watches its key, assembles only
/// complete versions, checks them, and publishes them at the source's version number through
/// the embedded owner; and one thread that hears the sources' heartbeats and decides, for each
/// segment, whether it is stale.
final class Importer: Sendable {
    /// One imported segment's shared state.
    final class Imported: Sendable {
        let settings: ImportedSegment
        let owned: OwnedSegment
        let freshness: Mutex<Freshness>
        /// The source epoch the local segment holds (0: none yet).
        let epoch = ManagedAtomic<UInt64>(0)
        /// Whether the local segment has had its first version.
        let hasVersion = ManagedAtomic<Bool>(false)
        /// The last state told to the owner, to send only changes (and a periodic refresh).
        let reported = Mutex<MirrorState?>(nil)

        init(settings: ImportedSegment, owned: OwnedSegment, freshness: Freshness) {
            self.settings = settings
            self.owned = owned
            self.freshness = Mutex(freshness)
        }
    }

    private let configuration: MirrorConfiguration
    private let owner: ShmBrokerOwner
    private let nats: NatsClient
    private let metrics: MirrorMetrics
    private let logger: Logger
    let segments: [Imported]

    init(configuration: MirrorConfiguration, owner: ShmBrokerOwner, nats: NatsClient, metrics: MirrorMetrics, logger: Logger) throws(OwnerError) {
        self.configuration = configuration
        self.owner = owner
        self.nats = nats
        self.metrics = metrics
        self.logger = logger
        let now = Clock.monotonicNanoseconds()
        var segments: [Imported] = []
        for settings in configuration.imports {
            let owned = try owner.segment(settings.definition.name)
            segments.append(Imported(settings: settings, owned: owned, freshness: Freshness(
                staleAfterSeconds: settings.staleAfterSeconds, clockToleranceSeconds: configuration.clockToleranceSeconds, now: now)))
        }
        self.segments = segments
    }

    /// Whether every imported segment has its first version or is marked stale: READY=1 waits for it.
    var isSettled: Bool {
        segments.allSatisfy { $0.hasVersion.load(ordering: .relaxed) || $0.freshness.withLock { $0.isStale } }
    }

    func start(stop: ManagedAtomic<Bool>) -> [Thread] {
        var threads = segments.map { imported in
            Thread { [self] in watch(imported, stop: stop) }
        }
        threads.append(Thread { [self] in heartbeats(stop: stop) })
        for (index, thread) in threads.enumerated() {
            thread.name = index < segments.count ? "import-\(segments[index].settings.definition.name)" : "staleness"
            thread.start()
        }
        return threads
    }

    // MARK: Values

    private func watch(_ imported: Imported, stop: ManagedAtomic<Bool>) {
        let name = imported.settings.definition.name
        let key = MirrorKeys.value(host: imported.settings.sourceHost, segment: imported.settings.sourceSegment)
        var watcher: BucketWatcher?
        var buffer: [UInt8] = []
        var lastEntryAt = Clock.monotonicNanoseconds(), lastPoll: UInt64 = 0
        // The bucket revision of the last value taken (applied, or rejected as hostile): a watch
        // that delivers older revisions after a partition (its backlog) is replaying, not
        // offering a version from the past. A value that failed for a passing reason (a chunk
        // could not be read) is not taken: the next delivery or read of the key tries it again.
        var appliedRevision: UInt64 = 0
        func take(_ entry: BucketEntry) throws {
            guard entry.isPut, entry.revision > appliedRevision else { return }
            do {
                try apply(entry.bytes, to: imported, buffer: &buffer)
            } catch let error as MirrorValueError {
                appliedRevision = entry.revision
                throw error
            }
            appliedRevision = entry.revision
        }
        let patience = UInt64(imported.settings.staleAfterSeconds * 1e9)
        while !stop.load(ordering: .relaxed) {
            do {
                if watcher == nil {
                    watcher = try nats.watch(key)
                    metrics.cleared("watch", for: name)
                }
                let now = Clock.monotonicNanoseconds()
                if let behindSince = imported.freshness.withLock({ $0.behindSince }), now &- behindSince > patience / 4,
                   now &- lastEntryAt > patience / 4, now &- lastPoll > patience / 4 {
                    // Heartbeats say the source is ahead and the watch has brought nothing for a
                    // while (after a partition a watch can stall): read the key itself, and restart
                    // a silent watch. A watch that delivers is left to catch up on its own.
                    lastPoll = now
                    if let entry = try nats.get(key) { try take(entry) }
                    if now &- lastEntryAt > 2 * patience {
                        watcher = nil
                        lastEntryAt = now
                        metrics.update(name, direction: "import") { $0.failures["watch-restarted", default: 0] += 1 }
                        continue
                    }
                }
                guard let entry = try watcher?.next(timeoutMilliseconds: 100) else { continue }
                lastEntryAt = Clock.monotonicNanoseconds()
                try take(entry)
            } catch let error as MirrorValueError {
                reject(error, imported)
            } catch let error as NatsError {
                watcher = nil
                metrics.update(name, direction: "import") { $0.failures[error.cause, default: 0] += 1 }
                if metrics.firstTime("watch", for: name) {
                    logger.warning("cannot watch or read the source's key; retrying", metadata: [
                        "segment": "\(name)", "key": "\(key)", "error": "\(error)", "serverSaid": "\(nats.lastAsyncError ?? "-")"])
                }
                usleep(250_000)
            } catch {
                metrics.update(name, direction: "import") { $0.failures["publish", default: 0] += 1 }
                if metrics.firstTime("publish", for: name) {
                    logger.error("cannot publish an imported version", metadata: ["segment": "\(name)", "error": "\(error)"])
                }
                usleep(100_000)
            }
        }
    }

    /// Checks a value and, when it completes a version newer than the local one, publishes it.
    private func apply(_ value: [UInt8], to imported: Imported, buffer: inout [UInt8]) throws {
        let settings = imported.settings, name = settings.definition.name
        let capacity = settings.definition.capacity, chunkSize = configuration.chunkSize
        let header = try value.withUnsafeBytes { bytes throws(MirrorValueError) in
            try MirrorValue.decode(bytes, capacity: capacity, chunkSize: chunkSize)
        }
        guard header.kind != .chunk else { throw MirrorValueError.badChunking("a chunk under the segment's own key") }
        let currentEpoch = imported.epoch.load(ordering: .relaxed)
        if currentEpoch != 0, header.epoch < currentEpoch {
            throw MirrorValueError.versionFromThePast(version: header.version, latest: imported.owned.latestVersion)
        }
        let latest = imported.owned.latestVersion
        if header.epoch == currentEpoch || currentEpoch == 0 {
            if header.version == latest { return }  // the watch's replay of what we have
            guard header.version > latest else { throw MirrorValueError.versionFromThePast(version: header.version, latest: latest) }
        }
        // Assemble before touching anything: a version is served whole or not at all.
        if header.kind == .commit {
            try assemble(header, settings: settings, into: &buffer)
        }
        if header.epoch != currentEpoch {
            if currentEpoch != 0 {
                // The source segment was created again: so is the local one. Readers get RETIRED
                // and reopen; the new epoch's numbers may be lower than the old one's.
                try owner.renew(name)
                logger.notice("the source segment was recreated (a new epoch): the local segment starts over", metadata: [
                    "segment": "\(name)", "source": "\(settings.sourceHost)/\(settings.sourceSegment)", "version": "\(header.version)"])
            }
            imported.epoch.store(header.epoch, ordering: .relaxed)
        }
        let receipt = try withPayload(header, value: value, buffer: buffer) { payload in
            do {
                return try imported.owned.publish(payload, atVersion: header.version, expectedCRC: header.crc64,
                                                  publishedAtNanoseconds: header.publishedAtNanoseconds)
            } catch OwnerError.checksumMismatch {
                throw MirrorValueError.checksumMismatch(version: header.version)
            }
        }
        imported.hasVersion.store(true, ordering: .relaxed)
        imported.freshness.withLock { $0.local(version: receipt.version, epoch: header.epoch, now: Clock.monotonicNanoseconds(), wall: Date()) }
        metrics.update(name, direction: "import") {
            $0.imported += 1
            $0.bytes += UInt64(receipt.length)
            if header.kind == .commit { $0.chunks += UInt64(header.chunkCount) }
            $0.localVersion = receipt.version
        }
    }

    private func withPayload<R>(_ header: MirrorValue, value: [UInt8], buffer: [UInt8],
                                _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        if header.kind == .commit {
            return try buffer.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[0..<Int(header.length)])) }
        }
        return try value.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[MirrorValue.headerSize...])) }
    }

    /// Reads a chunked version's chunks into `buffer`; every chunk must carry the commit's epoch,
    /// version, CRC and count, and its own index.
    private func assemble(_ commit: MirrorValue, settings: ImportedSegment, into buffer: inout [UInt8]) throws {
        if buffer.count < Int(commit.length) { buffer = [UInt8](repeating: 0, count: settings.definition.capacity) }
        for index in 0..<Int(commit.chunkCount) {
            let key = MirrorKeys.chunk(host: settings.sourceHost, segment: settings.sourceSegment, index: index)
            guard let entry = try nats.get(key), entry.isPut else { throw MirrorValueError.chunkMissing(index: index) }
            let chunk = try entry.bytes.withUnsafeBytes { bytes throws(MirrorValueError) in
                try MirrorValue.decode(bytes, capacity: settings.definition.capacity, chunkSize: configuration.chunkSize)
            }
            guard chunk.kind == .chunk, chunk.epoch == commit.epoch, chunk.version == commit.version, chunk.crc64 == commit.crc64,
                  chunk.length == commit.length, chunk.chunkCount == commit.chunkCount, chunk.chunkIndex == UInt32(index) else {
                throw MirrorValueError.chunkMismatch(index: index)
            }
            let start = index * configuration.chunkSize
            buffer.withUnsafeMutableBytes { out in
                entry.bytes.withUnsafeBytes { piece in
                    UnsafeMutableRawBufferPointer(rebasing: out[start..<(start + piece.count - MirrorValue.headerSize)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: piece[MirrorValue.headerSize...]))
                }
            }
        }
    }

    private func reject(_ error: MirrorValueError, _ imported: Imported) {
        let name = imported.settings.definition.name
        // A chunk replaced while it was read is the normal race with a fast source, not an attack.
        let benign = if case .chunkMismatch = error { true } else { false }
        metrics.update(name, direction: "import") { $0.rejected[error.cause, default: 0] += 1 }
        if !benign, metrics.firstTime("rejected-" + error.cause, for: name) {
            logger.error("rejected a value from the bucket; it is not served (logged once per cause)", metadata: [
                "segment": "\(name)", "source": "\(imported.settings.sourceHost)/\(imported.settings.sourceSegment)",
                "reason": "\(error.cause)", "detail": "\(error)"])
        }
    }

    // MARK: Heartbeats and staleness

    private func heartbeats(stop: ManagedAtomic<Bool>) {
        let prefix = "shmbroker.\(configuration.nats.bucket).heartbeat."
        var subscription: CoreSubscription?
        var lastReport: UInt64 = 0
        while !stop.load(ordering: .relaxed) {
            do {
                if subscription == nil {
                    subscription = try nats.subscribe(prefix + "*")
                    let now = Clock.monotonicNanoseconds()
                    for imported in segments { imported.freshness.withLock { $0.listening(since: now) } }
                }
                if let message = try subscription?.next(timeoutMilliseconds: 20) {
                    heard(message.bytes, host: String(message.subject.dropFirst(prefix.count)))
                }
            } catch {
                subscription = nil
                if metrics.firstTime("heartbeat-subscription", for: "*") {
                    logger.warning("cannot subscribe to heartbeats; retrying", metadata: ["error": "\(error)"])
                }
                usleep(100_000)
            }
            let now = Clock.monotonicNanoseconds(), wall = Date()
            let refresh = now &- lastReport >= 250_000_000
            if refresh { lastReport = now }
            for imported in segments { evaluate(imported, now: now, wall: wall, refresh: refresh) }
        }
    }

    private func heard(_ bytes: [UInt8], host: String) {
        guard segments.contains(where: { $0.settings.sourceHost == host }) else { return }
        guard let beat = bytes.withUnsafeBytes({ Heartbeat.decode($0, expectedHost: host) }) else {
            if metrics.firstTime("bad-heartbeat", for: host) {
                logger.error("rejected a malformed heartbeat", metadata: ["host": "\(host)", "bytes": "\(bytes.count)"])
            }
            return
        }
        let now = Clock.monotonicNanoseconds(), wall = Date()
        for imported in segments where imported.settings.sourceHost == host {
            let segment = beat.segments[imported.settings.sourceSegment]
                ?? Heartbeat.Segment(epoch: 0, version: 0, available: false)  // the source does not export it
            imported.freshness.withLock { _ = $0.heartbeat(sentAt: beat.sentAtNanoseconds, segment, now: now, wall: wall) }
        }
    }

    private func evaluate(_ imported: Imported, now: UInt64, wall: Date, refresh: Bool) {
        let (changed, freshness) = imported.freshness.withLock { freshness in
            (freshness.evaluate(now: now, wall: wall), freshness)
        }
        guard changed || refresh else { return }
        let settings = imported.settings
        let state = MirrorState(sourceHost: settings.sourceHost, sourceSegment: settings.sourceSegment,
                                sourceEpoch: freshness.epoch ?? 0, sourceVersion: freshness.sourceVersion,
                                behindSince: freshness.behindSinceWall, staleSince: freshness.staleSince, lastHeartbeatAt: freshness.lastHeardWall)
        guard changed || imported.reported.withLock({ $0 }) != state else { return }
        if changed {
            logger.notice(freshness.isStale ? "imported segment is stale" : "imported segment is fresh", metadata: [
                "segment": "\(settings.definition.name)", "reason": "\(freshness.reason ?? "caught up")",
                "sourceVersion": "\(freshness.sourceVersion)", "localVersion": "\(freshness.localVersion)"])
        }
        do {
            try owner.updateMirror(settings.definition.name, state)
            imported.reported.withLock { $0 = state }
        } catch {
            logger.error("cannot report the mirror state", metadata: ["segment": "\(settings.definition.name)", "error": "\(error)"])
        }
        let local = freshness.localVersion
        metrics.update(settings.definition.name, direction: "import") {
            $0.stale = freshness.isStale
            $0.sourceVersion = freshness.sourceVersion
            $0.lagVersions = freshness.sourceVersion > local ? freshness.sourceVersion - local : 0
            $0.lagSeconds = freshness.behindSince.map { Double(now &- $0) / 1e9 } ?? 0
        }
    }
}
