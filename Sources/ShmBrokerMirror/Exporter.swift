import Atomics
import Foundation
import Logging
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import Synchronization

/// Runs `body` (async) from a plain thread and waits for it: the mirror's threads block on
/// futexes and NATS calls, so they are threads, and reach the async client through this.
func blocking<T: Sendable>(_ body: @Sendable @escaping () async throws -> T) throws -> T {
    let outcome = Mutex<Result<T, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task {
        let result: Result<T, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        outcome.withLock { $0 = result }
        done.signal()
    }
    done.wait()
    return try outcome.withLock { $0! }.get()
}

/// The export side: for each exported segment a thread that sleeps on the segment's futex,
/// reads the newest version verified and puts it to the bucket (one put in flight; after a
/// failure the newest version is sent, never the failed one), and one heartbeat thread.
final class Exporter: Sendable {
    private let configuration: MirrorConfiguration
    private let settings: ExportSettings
    private let nats: NatsClient
    private let metrics: MirrorMetrics
    private let logger: Logger
    /// What the heartbeat says about each segment.
    private let beats = Mutex<[String: Heartbeat.Segment]>([:])
    /// This process's mark in the values it writes (``MirrorValue/writer``).
    let writerID = UInt64.random(in: 1...UInt64.max)

    init(configuration: MirrorConfiguration, settings: ExportSettings, nats: NatsClient, metrics: MirrorMetrics, logger: Logger) {
        self.configuration = configuration
        self.settings = settings
        self.nats = nats
        self.metrics = metrics
        self.logger = logger
    }

    /// Starts the threads; they end when `stop` is set.
    func start(stop: ManagedAtomic<Bool>) -> [Thread] {
        var threads = settings.segments.map { name in
            Thread { [self] in
                var export = SegmentExport(name: name, exporter: self)
                export.run(stop: stop)
            }
        }
        threads.append(Thread { [self] in heartbeats(stop: stop) })
        for (index, thread) in threads.enumerated() {
            thread.name = index < settings.segments.count ? "export-\(settings.segments[index])" : "heartbeat"
            thread.start()
        }
        return threads
    }

    private func heartbeats(stop: ManagedAtomic<Bool>) {
        let subject = MirrorKeys.heartbeat(bucket: configuration.nats.bucket, host: configuration.host)
        let interval = UInt32(configuration.heartbeatIntervalSeconds * 1e6)
        // The first heartbeat waits (up to 2 s) until every export has looked at its segment, so
        // that importers do not hear "not exported" from a mirror that is only starting.
        let began = Clock.monotonicNanoseconds()
        while beats.withLock({ $0.count }) < settings.segments.count, Clock.monotonicNanoseconds() &- began < 2_000_000_000,
              !stop.load(ordering: .relaxed) {
            usleep(10_000)
        }
        while !stop.load(ordering: .relaxed) {
            let beat = Heartbeat(host: configuration.host, sentAtNanoseconds: Clock.realtimeNanoseconds(),
                                 segments: beats.withLock { $0 })
            do {
                try nats.publish(subject, beat.encoded())
                metrics.cleared("heartbeat", for: "*")
            } catch {
                if metrics.firstTime("heartbeat", for: "*") {
                    logger.warning("cannot send the heartbeat; retrying", metadata: ["error": "\(error)"])
                }
            }
            usleep(interval)
        }
    }

    /// One exported segment's loop.
    private struct SegmentExport {
        let name: String
        let exporter: Exporter
        let key: String
        var client: ShmBrokerClient?
        var handle: SegmentHandle?
        var lastCheck: UInt64 = 0
        var available = false
        /// The key's last revision we know (nil: unknown, read it first; 0: the key does not exist).
        var lastRevision: UInt64?
        var sent: (epoch: UInt64, version: UInt64) = (0, 0)
        var fenced = false
        /// Where a version is read, verified, straight behind room for the value's header: the
        /// value put to the bucket is this buffer, with no second copy.
        var value: [UInt8] = []

        init(name: String, exporter: Exporter) {
            self.name = name
            self.exporter = exporter
            key = MirrorKeys.value(host: exporter.configuration.host, segment: name)
        }

        var logger: Logger { exporter.logger }
        var metrics: MirrorMetrics { exporter.metrics }

        mutating func run(stop: ManagedAtomic<Bool>) {
            let interval = UInt64(exporter.configuration.heartbeatIntervalSeconds * 1e9)
            while !stop.load(ordering: .relaxed) {
                refreshSource()
                guard let handle else {
                    // Heartbeats say the segment is unavailable, with the last epoch and version known.
                    exporter.beats.withLock { beats in
                        beats[name] = Heartbeat.Segment(epoch: beats[name]?.epoch ?? 0, version: beats[name]?.version ?? 0, available: false)
                    }
                    usleep(100_000)
                    continue
                }
                let epoch = handle.createdAtNanoseconds
                let already = epoch == sent.epoch ? sent.version : 0
                let latest = handle.waitForVersion(after: already, timeoutNanoseconds: interval)
                exporter.beats.withLock { $0[name] = Heartbeat.Segment(epoch: epoch, version: latest, available: available && !handle.isRetired) }
                guard latest > already || epoch != sent.epoch, latest > 0, !fenced else { continue }
                export(handle, epoch: epoch)
            }
        }

        /// Opens the segment (again) every second: the owner may have restarted, with the same
        /// memory from its fd store (same epoch) or a new segment (new epoch). A segment gone
        /// from the owner (retired, or not opened yet) is tried every 100 ms.
        mutating func refreshSource() {
            let now = Clock.monotonicNanoseconds()
            let missing = handle == nil || handle!.isRetired
            guard now &- lastCheck >= (missing ? 100_000_000 : 1_000_000_000) else { return }
            lastCheck = now
            let socket = exporter.settings.socket, name = self.name
            do {
                let client = try self.client ?? blocking { try await ShmBrokerClient.connect(socketPath: socket, clientName: "shmbroker-mirror") }
                self.client = client
                let opened = try blocking { try await client.open(name) }
                if handle == nil || handle!.createdAtNanoseconds != opened.createdAtNanoseconds {
                    if handle != nil {
                        logger.notice("exported segment was recreated: a new epoch", metadata: ["segment": "\(name)"])
                    }
                    handle = opened
                }
                if !available { logger.info("exporting segment", metadata: ["segment": "\(name)", "key": "\(key)"]) }
                available = true
                metrics.cleared("source", for: name)
            } catch {
                if available || metrics.firstTime("source", for: name) {
                    logger.warning("cannot open the exported segment at its owner; heartbeats say it is unavailable", metadata: [
                        "segment": "\(name)", "socket": "\(socket)", "error": "\(error)"])
                    _ = metrics.firstTime("source", for: name)
                }
                available = false
                // A retired mapping will never change again: drop it, so the loop sleeps instead
                // of returning from its wait at once.
                if handle?.isRetired == true { handle = nil }
                if let client, case ShmBrokerClientError.disconnected = error {
                    client.close()
                    self.client = nil
                }
            }
        }

        /// Reads the newest version and puts it; on failure the next round sends whatever is
        /// newest then.
        mutating func export(_ handle: SegmentHandle, epoch: UInt64) {
            let copied: SegmentReader.CopiedVersion
            do {
                guard let read = try readLatest(handle) else { return }
                copied = read
            } catch {
                count("source-read", error)
                return
            }
            do {
                if lastRevision == nil { lastRevision = try exporter.nats.get(key)?.revision ?? 0 }
                try put(copied, epoch: epoch)
                sent = (epoch, copied.version)
                metrics.update(name, direction: "export") {
                    $0.puts += 1
                    $0.bytes += UInt64(copied.length)
                    $0.localVersion = copied.version
                }
                for cause in ["timeout", "permission", "no-responders", "disconnected", "error"] { metrics.cleared(cause, for: name) }
            } catch let error as NatsError where error.isWrongLastRevision {
                resolveConflict()
            } catch {
                count((error as? NatsError)?.cause ?? "error", error)
                usleep(50_000)  // a moment before the next try, which sends the newest version
            }
        }

        /// Copies the latest version, verified, into `value` behind room for the header (the
        /// seqlock read retried while the owner replaces the slot); nil if never published.
        mutating func readLatest(_ handle: SegmentHandle) throws -> SegmentReader.CopiedVersion? {
            let needed = MirrorValue.headerSize + handle.capacity
            if value.count < needed { value = [UInt8](repeating: 0, count: needed) }
            let attempts = 10_000
            for _ in 0..<attempts {
                let attempt = try value.withUnsafeMutableBytes { buffer in
                    try handle.reader.readOnce(into: UnsafeMutableRawBufferPointer(rebasing: buffer[MirrorValue.headerSize...]))
                }
                switch attempt {
                case .copied(let copied): return copied
                case .neverPublished: return nil
                case .retry: continue
                }
            }
            throw SegmentError.contended(attempts: attempts)
        }

        /// Puts the version `readLatest` left in `value`: whole, or as chunks and a commit. Each
        /// value is written in place in the buffer: the header goes right in front of its bytes
        /// (for chunk i, over the tail of chunk i − 1, which is already in the bucket).
        mutating func put(_ copied: SegmentReader.CopiedVersion, epoch: UInt64) throws {
            let chunkSize = exporter.configuration.chunkSize, headerSize = MirrorValue.headerSize
            let count = MirrorValue.chunkCount(length: UInt64(copied.length), chunkSize: chunkSize)
            var header = MirrorValue(kind: count == 1 ? .whole : .chunk, epoch: epoch, version: copied.version, crc64: copied.crc64,
                                     length: UInt64(copied.length), publishedAtNanoseconds: copied.publishedAtNanoseconds,
                                     chunkCount: count == 1 ? 0 : count, writer: exporter.writerID)
            let nats = exporter.nats, host = exporter.configuration.host, name = self.name, key = self.key
            var revision = lastRevision
            try value.withUnsafeMutableBytes { buffer in
                if count == 1 {
                    header.write(into: buffer)
                    revision = try nats.put(key, UnsafeRawBufferPointer(rebasing: buffer[0..<(headerSize + copied.length)]),
                                            expectedRevision: revision)
                    return
                }
                for index in 0..<Int(count) {
                    header.chunkIndex = UInt32(index)
                    let start = index * chunkSize  // the chunk's bytes start at start + headerSize
                    let end = headerSize + min(start + chunkSize, copied.length)
                    header.write(into: UnsafeMutableRawBufferPointer(rebasing: buffer[start..<end]))
                    _ = try nats.put(MirrorKeys.chunk(host: host, segment: name, index: index),
                                     UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
                }
                header.kind = .commit
                header.chunkIndex = 0
                header.write(into: buffer)
                revision = try nats.put(key, UnsafeRawBufferPointer(rebasing: buffer[0..<headerSize]), expectedRevision: revision)
            }
            lastRevision = revision
            if count > 1 { metrics.update(name, direction: "export") { $0.chunks += UInt64(count) } }
        }

        /// A compare-and-set put failed: either one of our own earlier puts landed after all (its
        /// reply was lost, or it timed out and was committed later), and we adopt its revision,
        /// or another exporter writes this key, and we stop.
        mutating func resolveConflict() {
            do {
                guard let current = try exporter.nats.get(key) else {
                    lastRevision = 0
                    return
                }
                let header = current.bytes.withUnsafeBytes {
                    try? MirrorValue.decode($0, capacity: Int.max, chunkSize: exporter.configuration.chunkSize)
                }
                if let header, header.writer == exporter.writerID {
                    lastRevision = current.revision
                    return
                }
                fenced = true
                metrics.update(name, direction: "export") { $0.failures["fenced", default: 0] += 1 }
                logger.error("another exporter writes this key: this one stops exporting the segment (fenced). Give each host its own name; restart to take the key over", metadata: [
                    "segment": "\(name)", "key": "\(key)", "theirVersion": "\(header?.version ?? 0)"])
            } catch {
                count(error.cause, error)
                lastRevision = nil
            }
        }

        func count(_ cause: String, _ error: any Error) {
            metrics.update(name, direction: "export") { $0.failures[cause, default: 0] += 1 }
            if metrics.firstTime(cause, for: name) {
                logger.warning("export failed; the newest version will be sent when it can", metadata: [
                    "segment": "\(name)", "reason": "\(cause)", "error": "\(error)",
                    "serverSaid": "\(exporter.nats.lastAsyncError ?? "-")"])
            }
        }
    }
}
