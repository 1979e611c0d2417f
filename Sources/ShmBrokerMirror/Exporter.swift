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
        /// memory from its fd store (same epoch) or a new segment (new epoch).
        mutating func refreshSource() {
            let now = Clock.monotonicNanoseconds()
            guard handle == nil || handle!.isRetired || now &- lastCheck >= 1_000_000_000 else { return }
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
                if let client, case ShmBrokerClientError.disconnected = error {
                    client.close()
                    self.client = nil
                }
            }
        }

        /// Reads the newest version and puts it; on failure the next round sends whatever is
        /// newest then.
        mutating func export(_ handle: SegmentHandle, epoch: UInt64) {
            let snapshot: SegmentSnapshot
            do {
                guard let read = try handle.read() else { return }
                snapshot = read
            } catch {
                count("source-read", error)
                return
            }
            do {
                if lastRevision == nil { lastRevision = try exporter.nats.get(key)?.revision ?? 0 }
                try put(snapshot, epoch: epoch)
                sent = (epoch, snapshot.version)
                metrics.update(name, direction: "export") {
                    $0.puts += 1
                    $0.bytes += UInt64(snapshot.bytes.count)
                    $0.localVersion = snapshot.version
                }
                for cause in ["timeout", "permission", "no-responders", "disconnected", "error"] { metrics.cleared(cause, for: name) }
            } catch let error as NatsError where error.isWrongLastRevision {
                resolveConflict()
            } catch {
                count((error as? NatsError)?.cause ?? "error", error)
                usleep(50_000)  // a moment before the next try, which sends the newest version
            }
        }

        mutating func put(_ snapshot: SegmentSnapshot, epoch: UInt64) throws {
            let chunkSize = exporter.configuration.chunkSize
            let count = MirrorValue.chunkCount(length: UInt64(snapshot.bytes.count), chunkSize: chunkSize)
            var header = MirrorValue(kind: .whole, epoch: epoch, version: snapshot.version, crc64: snapshot.crc64,
                                     length: UInt64(snapshot.bytes.count), publishedAtNanoseconds: snapshot.publishedAtNanoseconds,
                                     writer: exporter.writerID)
            if count == 1 {
                let value = snapshot.bytes.withUnsafeBytes { header.encoded(payload: $0) }
                lastRevision = try exporter.nats.put(key, value, expectedRevision: lastRevision)
                return
            }
            header.kind = .chunk
            header.chunkCount = count
            try snapshot.bytes.withUnsafeBytes { bytes in
                for index in 0..<Int(count) {
                    header.chunkIndex = UInt32(index)
                    let start = index * chunkSize
                    let piece = UnsafeRawBufferPointer(rebasing: bytes[start..<min(start + chunkSize, bytes.count)])
                    _ = try exporter.nats.put(MirrorKeys.chunk(host: exporter.configuration.host, segment: name, index: index),
                                              header.encoded(payload: piece))
                }
            }
            metrics.update(name, direction: "export") { $0.chunks += UInt64(count) }
            header.kind = .commit
            header.chunkIndex = 0
            lastRevision = try exporter.nats.put(key, header.encoded(payload: UnsafeRawBufferPointer(start: nil, count: 0)),
                                                 expectedRevision: lastRevision)
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
