import Atomics
import Foundation
import Logging
import ShmBroker
import ShmBrokerConfig
import ShmBrokerPlatform
import Synchronization

/// `shmbroker-mirror`'s composition root: the NATS connection, the exporter, the importer (with
/// its embedded owner serving the imported segments), systemd notifications and the metrics
/// textfile. The main thread waits for signals and does the periodic work.
public final class Mirror {
    private let configuration: MirrorConfiguration
    private let logger: Logger
    private let signals: SignalDescriptor
    /// Watches the signalfd: the main thread sleeps here between its periodic work.
    private let epoll: Epoll
    private let notifier = SystemdNotifier(storesDescriptors: false)
    private let metrics = MirrorMetrics()
    private let stop = ManagedAtomic<Bool>(false)
    private let metricsTextfile: String?

    /// - Parameters:
    ///   - configuration: the checked configuration.
    ///   - logger: where events go.
    ///   - metricsTextfile: where to write the Prometheus text every few seconds, if anywhere.
    /// - Throws: if the signalfd cannot be made (call this before any other thread starts).
    public init(configuration: MirrorConfiguration, logger: Logger, metricsTextfile: String?) throws {
        self.configuration = configuration
        self.logger = logger
        self.metricsTextfile = metricsTextfile
        signals = try SignalDescriptor(signals: [SIGTERM, SIGINT, SIGHUP])
        epoll = try Epoll()
        try epoll.add(signals.descriptor, events: .readable, token: 1)
    }

    /// Runs until SIGTERM or SIGINT. Returns the process's exit status.
    public func run() -> Int32 {
        guard let nats = connect() else { return 0 }  // stopped by a signal while connecting
        var owner: ShmBrokerOwner?
        var importer: Importer?
        if let socket = configuration.importSocket, !configuration.imports.isEmpty {
            do {
                var options = ShmBrokerOwner.Options(handlesSignals: false, logger: logger, adoptsSystemdDescriptors: false,
                                                     name: "shmbroker-mirror")
                options.reportsToSystemd = false  // READY, STATUS and the watchdog are the mirror's
                let imported = try ShmBrokerOwner(configuration: BrokerConfiguration(socket: socket, segments: configuration.imports.map(\.definition)),
                                                  options: options)
                importer = try Importer(configuration: configuration, owner: imported, nats: nats, metrics: metrics, logger: logger)
                try imported.start()
                owner = imported
            } catch {
                logger.critical("cannot serve the imported segments: \(error)")
                return 1
            }
        }
        var threads: [Thread] = []
        var bound = false
        var ready = false
        var lastMetrics: UInt64 = 0
        let watchdog = notifier.watchdogIntervalMicroseconds().map { $0 * 1000 / 2 }
        var lastWatchdog: UInt64 = 0
        logger.info("starting", metadata: ["host": "\(configuration.host)", "exports": "\(configuration.export?.segments.count ?? 0)",
                                           "imports": "\(configuration.imports.count)", "bucket": "\(configuration.nats.bucket)"])
        while !stop.load(ordering: .relaxed) {
            waitForSignals(milliseconds: 50)
            let now = Clock.monotonicNanoseconds()
            if !bound {
                do {
                    try nats.bindBucket(creation: configuration.nats.createBucket)
                    bound = true
                    logger.info("bucket bound", metadata: ["bucket": "\(configuration.nats.bucket)"])
                    if let export = configuration.export {
                        threads += Exporter(configuration: configuration, settings: export, nats: nats, metrics: metrics, logger: logger).start(stop: stop)
                    }
                    if let importer { threads += importer.start(stop: stop) }
                } catch {
                    if metrics.firstTime("bucket", for: "*") {
                        logger.warning("cannot bind the bucket yet; retrying", metadata: ["error": "\(error)", "serverSaid": "\(nats.lastAsyncError ?? "-")"])
                    }
                }
            }
            if bound, !ready, nats.isConnected, importer?.isSettled ?? true {
                ready = true
                notifier.ready(status: statusLine(nats))
                logger.info("ready")
            }
            if let watchdog, now &- lastWatchdog >= watchdog {
                lastWatchdog = now
                notifier.watchdogAlive()
            }
            if now &- lastMetrics >= 2_000_000_000 {
                lastMetrics = now
                metrics.setReconnects(nats.reconnects)
                if ready { notifier.status(statusLine(nats)) }
                writeMetrics()
            }
        }
        notifier.stopping(status: "stopping")
        for thread in threads { while thread.isExecuting { usleep(10_000) } }
        owner?.stop()
        writeMetrics()
        return 0
    }

    /// Connects to NATS, trying every second and saying why it cannot (once per distinct
    /// reason), from a thread of its own so that SIGTERM is answered meanwhile. Nil if stopped.
    private func connect() -> NatsClient? {
        let made = Mutex<NatsClient?>(nil)
        let configuration = self.configuration, logger = self.logger, stop = self.stop
        let thread = Thread {
            var reasons: Set<String> = []  // each distinct reason is logged once
            while !stop.load(ordering: .relaxed) {
                do throws(NatsError) {
                    let client = try NatsClient(configuration.nats, name: "shmbroker-mirror \(configuration.host)", logger: logger)
                    made.withLock { $0 = client }
                    logger.info("connected to NATS")
                    return
                } catch {
                    if reasons.count < 32, reasons.insert(error.text).inserted {
                        logger.error("cannot connect to NATS yet; retrying every second", metadata: [
                            "servers": "\(configuration.nats.servers.joined(separator: ","))", "error": "\(error)"])
                    }
                    usleep(1_000_000)
                }
            }
        }
        thread.name = "nats-connect"
        thread.start()
        notifier.status("connecting to NATS")
        while !stop.load(ordering: .relaxed) {
            if let client = made.withLock({ $0 }) { return client }
            waitForSignals(milliseconds: 50)
        }
        return nil
    }

    private func waitForSignals(milliseconds: Int32) {
        _ = try? epoll.wait(timeoutMilliseconds: milliseconds)
        for signal in signals.drain() where signal == SIGTERM || signal == SIGINT {
            logger.notice("received \(signal == SIGTERM ? "SIGTERM" : "SIGINT"), stopping")
            stop.store(true, ordering: .relaxed)
        }
    }

    private func statusLine(_ nats: NatsClient) -> String {
        let segments = metrics.snapshot()
        let stale = segments.values.filter(\.stale).count
        return "\(nats.isConnected ? "connected" : "DISCONNECTED"); exporting \(configuration.export?.segments.count ?? 0), "
            + "importing \(configuration.imports.count) (\(stale) stale)"
    }

    private func writeMetrics() {
        guard let metricsTextfile else { return }
        do {
            try FileSystem.replace(metricsTextfile, with: [Array(metrics.text().utf8)], permissions: 0o644, durable: false)
        } catch {
            if metrics.firstTime("metrics-textfile", for: "*") {
                logger.error("cannot write the metrics textfile", metadata: ["path": "\(metricsTextfile)", "error": "\(error)"])
            }
        }
    }
}
