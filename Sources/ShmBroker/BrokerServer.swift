import Atomics
import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The owner's composition root: it builds the event loop, the control front (listener, client
/// connections, request handling, publish rings) and the segment registry with its persistence,
/// and registers the periodic jobs. `shmbrokerd` and an embedding application both run one.
///
/// Where each concern lives (all in this module): `Loop/EventLoop.swift` (epoll, timer jobs, work
/// posted from other threads), `Front/` (listener, clients, requests, publish rings), `Segments/`
/// (creation, reload, persistence, memory budget), `Publishing/` (metrics), `Owner/` (the
/// embedding API), `Systemd/` (sd_notify, the fd store, the journal).
///
/// Everything that touches segments or clients runs on the loop's thread, so nothing here needs a
/// lock; readers never talk to the loop to read, only to open and subscribe.
public final class BrokerServer {
    /// The release version, reported by HELLO and STATUS (`ShmBrokerVersion` of ShmBrokerProtocol).
    public static let version = ShmBrokerVersion.string

    var configuration: BrokerConfiguration
    /// Who this owner is: its name, its config file, when it started, its uid.
    let identity: OwnerIdentity
    let logger: Logger
    let notifier: SystemdNotifier
    /// How the owner fits into its process: the signals it handles.
    let process: ProcessIntegration
    let loop: EventLoop
    let listener: Listener
    /// Set when the stop is asked for (a signal, ``ShmBrokerOwner/stop()``): the loop ends its
    /// turn and the owner shuts down. A publish that fails from then on failed because of the stop.
    let stopping = ManagedAtomic<Bool>(false)
    /// The metrics (`shmbrokerctl metrics`, and the textfile when configured).
    let metrics = BrokerMetrics()
    /// Where every version is committed; its sinks fan out events and count.
    let pipeline = PublishPipeline()
    /// Which persistent segments have versions to save, and the queue their files are written on.
    let persistence = PersistenceSink()
    var archive: SegmentArchive { SegmentArchive(directory: configuration.persistence.directory, trustedOwners: [daemonUID]) }

    /// The configured segments (and the ones the embedding application claimed).
    let segments = SegmentRegistry()
    /// The connected clients.
    let clients = ClientDirectory()
    /// The publish rings producers attached.
    let rings = RingSet()
    /// Every count the owner keeps; STATUS and the metrics are views of it.
    let counters = Counters()

    /// The uid the owner runs as: with root, it may always read, publish and see everything.
    var daemonUID: UInt32 { identity.uid }

    /// Prepares the server; nothing is created until ``start()``.
    ///
    /// - Parameters:
    ///   - configuration: the validated configuration.
    ///   - configPath: where it came from; SIGHUP re-reads this file.
    ///   - signals: a signalfd for SIGTERM, SIGINT, SIGHUP and SIGUSR2, created before any thread started.
    ///   - logger: where events go.
    ///   - notifier: how `sd_notify` messages and the fd store are reached.
    ///   - inherited: descriptors from systemd: a listening socket and stored segment memfds.
    ///   - allowDebugHang: let SIGUSR2 hang the event loop, to test the watchdog. Never in production.
    ///   - ownerName: the owner process's name, reported with the version by HELLO and STATUS.
    public init(configuration: BrokerConfiguration, configPath: String, signals: SignalDescriptor?, logger: Logger,
                notifier: SystemdNotifier = SystemdNotifier(), inherited: InheritedDescriptors = InheritedDescriptors(),
                allowDebugHang: Bool = false, ownerName: String = "shmbrokerd") throws {
        self.identity = OwnerIdentity(name: ownerName, configPath: configPath, startedAt: Date(), uid: CurrentProcess.userID)
        self.configuration = configuration
        self.process = ProcessIntegration(signals: signals, allowDebugHang: allowDebugHang)
        self.logger = logger
        self.notifier = notifier
        self.loop = try EventLoop()
        self.listener = Listener(loop: loop, logger: logger, inherited: inherited.listener)
        segments.stored = inherited
        segments.stored.listener = nil
        pipeline.register(PublishCounting(counters: counters))
        pipeline.register(SubscriberFanOut(server: self))
        pipeline.register(persistence)
    }


    // MARK: Life cycle

    /// Creates every segment, listens on the control socket, and reports READY=1: in that order,
    /// so a reader that sees the daemon ready can open every configured segment.
    public func start() throws {
        try start(claims: [])
    }

    /// ``start()`` for an embedding owner: `claims` are bound to their segments after the
    /// segments exist and before the socket listens, so no client can publish to them first.
    func start(claims: [OwnedSegment]) throws {
        try checkDescriptorBudget(configuration, context: "start")
        // Segments taken back from the fd store already have their memory.
        try MemoryBudget.check(configuration.segments.filter { segments.stored.segments[$0.name] == nil })
        if let risk = MemoryBudget.sparseRisk(configuration.segments) { logger.warning("\(risk)") }
        if configuration.segments.contains(where: \.persists) { try preparePersistenceDirectory() }
        for definition in configuration.segments {
            addSegment(try restoreOrCreate(definition))
        }
        for owned in claims {
            if let failure = claim(owned) { throw failure }
        }
        for (name, descriptor) in segments.stored.segments {
            logger.notice("stored segment is no longer configured; dropping it", metadata: ["segment": "\(name)"])
            notifier.removeStored(name: InheritedDescriptors.segmentNamePrefix + name)
            descriptor.closeQuietly()
        }
        for (name, descriptor) in segments.stored.boards {
            notifier.removeStored(name: InheritedDescriptors.boardNamePrefix + name)
            descriptor.closeQuietly()
        }
        for (descriptor, name) in segments.stored.unrecognised {
            logger.warning("closing an unrecognised descriptor passed by systemd", metadata: ["name": "\(name)"])
            descriptor.closeQuietly()
        }
        segments.stored = InheritedDescriptors()
        listener.onConnection = { [unowned self] socket, credentials in self.admit(socket, credentials: credentials) }
        listener.census = { [unowned self] in (self.clients.count, self.segments.count) }
        listener.onRefusal = { [unowned self] in self.counters.clientsRefused += 1 }
        try listener.listen(configuration.socket)
        if let descriptor = process.signals {
            _ = try loop.register(descriptor.descriptor, events: .readable, source: CallbackSource { [unowned self] _ in self.handleSignals() })
        }
        loop.onDoorbell = { [unowned self] in self.announceOwnedSegments(onlyPending: true) }
        loop.poll("publish rings") { [unowned self] in
            self.drainActiveRings()
            return self.rings.hasActive
        }
        loop.poll("spinning on publish rings") { [unowned self] in self.spinOnRings() }
        let watchdog = notifier.watchdogIntervalMicroseconds().map { $0 * 1000 }
        try registerJobs(watchdogNanoseconds: watchdog)
        loop.acceptWork()  // from here on, work posted by other threads goes to the loop
        logger.info("ready", metadata: [
            "segments": "\(segments.count)", "socket": "\(configuration.socket.path)",
            "watchdog": "\(watchdog.map { "\($0 / 1_000_000)ms" } ?? "off")",
        ])
        notifier.ready(status: statusLine())
    }


    /// The periodic work, one named job per concern, on one timer that ticks every 250 ms (or a
    /// quarter of the watchdog interval, if shorter).
    func registerJobs(watchdogNanoseconds: UInt64?) throws {
        let second: UInt64 = 1_000_000_000
        var lastStatusLine = ""
        loop.every(2 * second, "status line") { [unowned self] _ in
            // Keep `systemctl status` current; only changes are sent.
            let line = statusLine()
            if line != lastStatusLine {
                lastStatusLine = line
                notifier.status(line)
            }
        }
        loop.every(0, "refused connections and accept pauses") { [unowned self] now in listener.tick(now: now) }
        if let watchdogNanoseconds {
            // Sent from the loop itself: if the loop hangs, the pings stop and systemd steps in.
            loop.every(watchdogNanoseconds / 2, "watchdog") { [unowned self] _ in notifier.watchdogAlive() }
        }
        loop.every(0, "owner announcements") { [unowned self] _ in announceOwnedSegments(onlyPending: false) }
        var lastMetricsWrite: UInt64 = 0
        var metricsWriteFailed = false
        loop.every(0, "metrics textfile") { [unowned self] now in
            guard configuration.metrics.textfile != nil,
                  now &- lastMetricsWrite >= UInt64(configuration.metrics.intervalSeconds * 1e9) else { return }
            lastMetricsWrite = now
            writeMetricsTextfile(failedBefore: &metricsWriteFailed)
        }
        var lastPersistenceRound = Clock.monotonicNanoseconds()
        loop.every(0, "persistence") { [unowned self] now in
            guard now &- lastPersistenceRound >= UInt64(configuration.persistence.intervalSeconds * 1e9) else { return }
            lastPersistenceRound = now
            savePersistentSegments(synchronously: false)
        }
        loop.every(0, "futex backstop") { [unowned self] _ in
            // A sleeper that registered on the board too late for a publish's wake-up is woken
            // here at the latest (see SegmentWriter.wakeAllWaiters()).
            for segment in segments.values {
                let latest = segment.writer.latestVersion
                if latest != segment.versionAtLastBackstop {
                    segment.versionAtLastBackstop = latest
                    segment.writer.wakeAllWaiters()
                }
            }
        }
        loop.every(0, "stalled subscribers") { [unowned self] now in
            let stallLimit = UInt64(configuration.limits.subscriberStallTimeoutSeconds * 1e9)
            for client in Array(clients.values) {
                if let since = client.stalledSince, now &- since >= stallLimit, !client.isClosing {
                    counters.slowSubscribersDisconnected += 1
                    for name in client.subscriptions { counters[segment: name].slowSubscribersDropped += 1 }
                    disconnect(client, reason: "socket stayed full for \(configuration.limits.subscriberStallTimeoutSeconds)s")
                }
            }
        }
        var tick: UInt64 = 250_000_000
        if let watchdogNanoseconds { tick = min(tick, max(watchdogNanoseconds / 4, 1_000_000)) }
        try loop.startTimer(tickNanoseconds: tick)
    }

    /// Runs the loop until SIGTERM or SIGINT, then says STOPPING=1 and closes everything.
    public func run() throws {
        try loop.run(while: { !stopping.load(ordering: .relaxed) }, onTurn: { metrics.loopTurn(nanoseconds: $0) })
        shutDown()
    }

    func shutDown() {
        stopping.store(true, ordering: .releasing)  // also when the loop ended by an error
        notifier.stopping(status: "stopping: closing \(clients.count) clients")
        // Saves in flight finish first; then every changed persistent segment is saved, here.
        persistence.queue.sync {}
        savePersistentSegments(synchronously: true)
        for owned in segments.owned { owned.exclusively { owned.bind(writer: nil, signals: nil) } }
        logger.info("stopping", metadata: ["clients": "\(clients.count)", "publishes": "\(totalPublishes)"])
        for client in clients.values { disconnect(client, reason: nil) }
        loop.finishTurn()
        listener.close()
    }

    func handleSignals() {
        for signal in process.signals?.drain() ?? [] {
            switch signal {
            case SIGTERM, SIGINT:
                logger.notice("received \(signal == SIGTERM ? "SIGTERM" : "SIGINT"), shutting down")
                stopping.store(true, ordering: .releasing)
            case SIGHUP:
                reload()
            case SIGUSR2 where process.allowDebugHang:
                logger.warning("SIGUSR2 with --debug-allow-hang: hanging the event loop to test the watchdog")
                CurrentProcess.sleepForever()
            case SIGUSR2:
                logger.notice("ignoring SIGUSR2 (only --debug-allow-hang makes it hang the loop)")
            default:
                break
            }
        }
    }


    func statusLine() -> String {
        "serving \(segments.count) segment\(segments.count == 1 ? "" : "s") to \(clients.count) client\(clients.count == 1 ? "" : "s"); \(totalPublishes) publishes"
    }
}

/// Failures that stop the daemon from starting.
public enum DaemonError: Error, CustomStringConvertible {
    case socketInUse(String)
    case socketOwnership(String, Errno)
    case cannotListen(String, String)
    case descriptorLimit(segments: Int, needed: Int, limit: Int)
    case notASocket(String, String)
    case persistence(String)

    public var description: String {
        switch self {
        case .persistence(let message): return message
        case let .notASocket(path, kind):
            return "cannot listen on \(path): it exists and is \(kind), not a socket; remove it or choose another socket.path"
        case let .descriptorLimit(segments, needed, limit):
            return "the config's \(segments) segments need \(needed) open files but the descriptor limit (RLIMIT_NOFILE) is \(limit); raise LimitNOFILE= or ulimit -n, or configure fewer segments"
        case .socketInUse(let path): return "another process is already serving \(path) (it accepted a connection)"
        case let .socketOwnership(path, error): return "cannot set the owner of \(path): \(error)"
        case let .cannotListen(path, reason): return "cannot listen on \(path): \(reason)"
        }
    }
}

/// How the owner fits into its process.
struct ProcessIntegration {
    /// The signalfd for the signals the loop handles (SIGTERM, SIGINT, SIGHUP, SIGUSR2), created
    /// before any thread started; nil when the application handles signals.
    let signals: SignalDescriptor?
    /// Whether SIGUSR2 hangs the loop, to test the watchdog. Never in production.
    let allowDebugHang: Bool
}

/// Who an owner is, as HELLO and STATUS report it.
struct OwnerIdentity {
    /// `shmbrokerd`, or the embedding application's name.
    let name: String
    /// The config file SIGHUP re-reads; empty for a configuration built in code.
    let configPath: String
    let startedAt: Date
    /// The uid the owner runs as.
    let uid: UInt32
}
