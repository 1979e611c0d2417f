import Atomics
import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The daemon's single-threaded event loop: one epoll over the listening socket, every client
/// socket, a signalfd (SIGTERM, SIGINT, SIGHUP, and SIGUSR2 for watchdog tests) and a periodic
/// timer (watchdog, STATUS= refresh, stall checks).
///
/// Everything that touches segments or clients runs on this one thread, so nothing here needs a
/// lock; readers never talk to this loop to read, only to open and subscribe.
public final class BrokerServer {
    /// The release version, reported by HELLO and STATUS (``ShmBrokerVersion``).
    public static let version = ShmBrokerVersion.string

    enum Token {
        static let listener: UInt64 = 1
        static let signals: UInt64 = 2
        static let timer: UInt64 = 3
        /// The owner's doorbell: tasks posted from other threads, announcements of in-process publishes.
        static let wakeup: UInt64 = 4
        static let firstClient: UInt64 = 16
        /// Publish rings' doorbells; client tokens never reach this.
        static let firstRing: UInt64 = 1 << 62
    }

    var configuration: BrokerConfiguration
    let configPath: String
    /// `shmbrokerd`, or the embedding application's name: HELLO and STATUS report it.
    let ownerName: String
    let logger: Logger
    let notifier: SystemdNotifier
    let signals: SignalDescriptor?
    /// Rung (never read; edge-triggered) by other threads of an embedding owner process.
    let wakeup: Doorbell
    private let taskLock = NSLock()
    private var tasks: [(id: UInt64, body: (BrokerServer) -> Void)] = []
    private var nextTaskID: UInt64 = 0
    /// Whether ``run()`` is looping, for threads that post tasks.
    let loopRunning = ManagedAtomic<Bool>(false)
    /// Set as the stop begins, before owned segments refuse publishes: a publish that fails from
    /// then on failed because of the stop.
    let stopping = ManagedAtomic<Bool>(false)
    /// The metrics (`shmbrokerctl metrics`, and the textfile when configured).
    let metrics = BrokerMetrics()
    /// Every segment an embedding application claimed, also after a reload retired it.
    var ownedSegments: [OwnedSegment] = []
    /// Saves of persistent segments run here, off the loop; the loop only takes the snapshot.
    let persistenceQueue = DispatchQueue(label: "shmbroker.persistence")
    var lastPersistenceRound: UInt64 = 0
    var lastMetricsWrite: UInt64 = 0
    var metricsWriteFailed = false
    var archive: SegmentArchive { SegmentArchive(directory: configuration.persistence.directory, trustedOwners: [daemonUID]) }
    let epoll: Epoll
    var listener: FileDescriptor?
    var ownsSocketPath = false
    var inherited: InheritedDescriptors
    let allowDebugHang: Bool
    var timer: PeriodicTimer?
    var watchdogIntervalNanoseconds: UInt64?
    var lastWatchdogPing: UInt64 = 0

    var segments: [String: ManagedSegment] = [:]
    var segmentOrder: [String] = []
    var clients: [UInt64: ClientConnection] = [:]
    /// Connections held by each uid, for `limits.maxClientsPerUser`.
    var connectionsPerUID: [UInt32: Int] = [:]
    /// Whether the listener is out of the epoll set because accept ran out of descriptors.
    var listenerPaused = false
    var acceptPauses = 0
    var lastAcceptPauseLog: UInt64 = 0
    var nextClientID = Token.firstClient
    /// Attached publish rings, by their doorbell's token.
    var rings: [UInt64: AttachedRing] = [:]
    var nextRingToken = Token.firstRing
    /// Rings that still had entries after their last batch: the loop polls instead of sleeping.
    var activeRings: [UInt64] = []
    var counters = StatusReport.Counters()
    let startedAt = Date()
    let daemonUID = CurrentProcess.userID
    var running = true
    /// Refused connections, kept open (write side shut) until a deadline so the refusal arrives.
    var refusedSockets: [(socket: FileDescriptor, closeAfter: UInt64)] = []
    /// Refusals are logged at most a few a second; the rest are counted in the next line.
    var refusalLog = RateLimitedLog(linesPerInterval: 5, intervalNanoseconds: 1_000_000_000)
    /// How often STATUS= is refreshed (when it changed).
    static let statusInterval: UInt64 = 2_000_000_000
    var lastStatusUpdate: UInt64 = 0
    var lastStatusLine = ""

    /// One receive buffer for every client: the loop handles one frame at a time.
    let receiveBuffer = UnsafeMutableRawBufferPointer.allocate(
        byteCount: ControlProtocol.maximumFrameSize + 1, alignment: 16)

    /// Prepares the server; nothing is created until ``start()``.
    ///
    /// - Parameters:
    ///   - configuration: the validated configuration.
    ///   - configPath: where it came from; SIGHUP re-reads this file.
    ///   - signals: a signalfd for SIGTERM, SIGINT, SIGHUP and SIGUSR2, created before any thread started.
    ///   - logger: where events go.
    ///   - inherited: descriptors from systemd: a listening socket and stored segment memfds.
    ///   - allowDebugHang: let SIGUSR2 hang the event loop, to test the watchdog. Never in production.
    ///   - ownerName: the owner process's name, reported with the version by HELLO and STATUS.
    public init(configuration: BrokerConfiguration, configPath: String, signals: SignalDescriptor?, logger: Logger,
                notifier: SystemdNotifier = SystemdNotifier(), inherited: InheritedDescriptors = InheritedDescriptors(),
                allowDebugHang: Bool = false, ownerName: String = "shmbrokerd") throws {
        self.ownerName = ownerName
        self.configuration = configuration
        self.inherited = inherited
        self.allowDebugHang = allowDebugHang
        self.configPath = configPath
        self.signals = signals
        self.logger = logger
        self.notifier = notifier
        self.epoll = try Epoll()
        self.wakeup = try Doorbell()
    }

    deinit {
        receiveBuffer.deallocate()
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
        try MemoryBudget.check(configuration.segments.filter { inherited.segments[$0.name] == nil })
        if configuration.segments.contains(where: \.persists) { try preparePersistenceDirectory() }
        for definition in configuration.segments {
            addSegment(try restoreOrCreate(definition))
        }
        lastPersistenceRound = Clock.monotonicNanoseconds()
        for owned in claims {
            if let failure = claim(owned) { throw failure }
        }
        for (name, descriptor) in inherited.segments {
            logger.notice("stored segment is no longer configured; dropping it", metadata: ["segment": "\(name)"])
            notifier.removeStored(name: InheritedDescriptors.segmentNamePrefix + name)
            descriptor.closeQuietly()
        }
        inherited.segments = [:]
        for (name, descriptor) in inherited.boards {
            notifier.removeStored(name: InheritedDescriptors.boardNamePrefix + name)
            descriptor.closeQuietly()
        }
        inherited.boards = [:]
        for (descriptor, name) in inherited.unrecognised {
            logger.warning("closing an unrecognised descriptor passed by systemd", metadata: ["name": "\(name)"])
            descriptor.closeQuietly()
        }
        inherited.unrecognised = []
        try listen()
        if let signals { try epoll.add(signals.descriptor, events: .readable, token: Token.signals) }
        try epoll.add(wakeup.descriptor, events: [.readable, .edgeTriggered], token: Token.wakeup)
        watchdogIntervalNanoseconds = notifier.watchdogIntervalMicroseconds().map { $0 * 1000 }
        var tick: UInt64 = 250_000_000
        if let watchdog = watchdogIntervalNanoseconds { tick = min(tick, max(watchdog / 4, 1_000_000)) }
        let timer = try PeriodicTimer(intervalNanoseconds: tick)
        try epoll.add(timer.descriptor, events: .readable, token: Token.timer)
        self.timer = timer
        loopRunning.store(true, ordering: .releasing)  // from here on, tasks go to the loop
        logger.info("ready", metadata: [
            "segments": "\(segments.count)", "socket": "\(configuration.socket.path)",
            "watchdog": "\(watchdogIntervalNanoseconds.map { "\($0 / 1_000_000)ms" } ?? "off")",
        ])
        notifier.ready(status: statusLine())
    }

    /// Descriptors the daemon needs besides one per segment and one per client: epoll, signalfd,
    /// timer, listener, standard streams, the notify socket, and room for replies in flight.
    static let descriptorHeadroom = 64

    /// Each segment holds a descriptor (its memfd) and each client one (its socket): a config
    /// whose segments alone do not fit `RLIMIT_NOFILE` is refused, naming the numbers; one whose
    /// segments plus `maxClients` do not fit is logged, since the client limit cannot then be
    /// reached.
    func checkDescriptorBudget(_ configuration: BrokerConfiguration, context: String) throws {
        guard let available = ResourceLimits.openFiles().current else { return }
        let segmentCount = configuration.segments.count
        // On reload the running segments stay open until the new ones exist.
        // Two per segment: its memfd and its wait board.
        let during = 2 * (context == "reload" ? segmentCount + segments.count : segmentCount)
        guard during + Self.descriptorHeadroom <= available else {
            throw DaemonError.descriptorLimit(segments: segmentCount, needed: during + Self.descriptorHeadroom, limit: available)
        }
        let wanted = 2 * segmentCount + configuration.limits.maximumClients + Self.descriptorHeadroom
        if wanted > available {
            logger.warning("the descriptor limit is below what the config can use", metadata: [
                "segments": "\(segmentCount)", "maxClients": "\(configuration.limits.maximumClients)",
                "needed": "\(wanted)", "rlimitNofile": "\(available)",
                "hint": "raise LimitNOFILE= in the unit or lower limits.maxClients",
            ])
        }
    }

    /// Takes a segment back from the fd store if an earlier run stored it, else creates it.
    /// A stored segment that fails its checks is logged and recreated empty, never served.
    func restoreOrCreate(_ definition: SegmentDefinition) throws -> ManagedSegment {
        let storedBoard = inherited.boards.removeValue(forKey: definition.name)
        guard let stored = inherited.segments.removeValue(forKey: definition.name) else {
            storedBoard?.closeQuietly()
            let segment = try ManagedSegment(creating: definition)
            restoreFromDisk(segment)
            storeInSystemd(segment)
            return segment
        }
        do {
            let segment = try ManagedSegment(adopting: stored, board: storedBoard, definition: definition)
            if segment.boardFile != storedBoard { notifier.store(segment.boardFile, name: segment.boardStoreName) }
            logger.info("segment restored from the fd store", metadata: [
                "segment": "\(definition.name)", "version": "\(segment.writer.latestVersion)",
            ])
            return segment
        } catch {
            let replacement = try ManagedSegment(creating: definition)
            if case ManagedSegment.AdoptionError.layoutChanged(_, _, let oldWriter) = error {
                carryOver(from: oldWriter, to: replacement)
                logger.notice("stored segment resized per the config", metadata: ["segment": "\(definition.name)", "detail": "\(error)"])
            } else {
                logger.error("stored segment failed its checks; recreated empty", metadata: [
                    "segment": "\(definition.name)", "error": "\(error)",
                ])
            }
            stored.closeQuietly()
            notifier.removeStored(name: replacement.storeName)
            notifier.removeStored(name: replacement.boardStoreName)
            storeInSystemd(replacement)
            return replacement
        }
    }

    // MARK: Persistence

    /// Creates the directory of saved segments (0700) if needed, and checks that nobody the
    /// daemon does not trust can plant or replace files in it; a config with persistent segments
    /// does not start without one.
    func preparePersistenceDirectory() throws {
        let directory = configuration.persistence.directory
        do {
            try FileSystem.createDirectory(directory, permissions: 0o700)
            try FileSystem.checkTrustedDirectory(directory, owners: [daemonUID])
        } catch {
            throw DaemonError.persistence("the persistence directory cannot be used: \(error) (set StateDirectory= in the unit, or persistence.directory)")
        }
        guard FileSystem.isWritable(directory) else {
            throw DaemonError.persistence("the persistence directory \(directory) is not writable by uid \(daemonUID) (set StateDirectory= in the unit, or persistence.directory)")
        }
    }

    /// Brings back the saved version of a new persistent segment, with its number and time. A
    /// file that fails its checks is logged, moved aside (`.rejected`, every copy kept) and not
    /// served; a file that cannot be read is logged and left where it is.
    func restoreFromDisk(_ segment: ManagedSegment) {
        guard segment.definition.persists else { return }
        do {
            guard let saved = try archive.load(segment.name, capacity: segment.definition.capacity) else { return }
            _ = try saved.bytes.withUnsafeBytes { bytes throws(SegmentError) in
                try segment.writer.restore(bytes, version: saved.version, expectedCRC: saved.crc64,
                                           publishedAtNanoseconds: saved.publishedAtNanoseconds)
            }
            segment.saves.savedVersion.store(saved.version, ordering: .relaxed)
            logger.info("segment restored from disk", metadata: [
                "segment": "\(segment.name)", "version": "\(saved.version)", "bytes": "\(saved.bytes.count)",
            ])
        } catch let failure as SegmentArchive.Failure where !failure.movesFileAside {
            logger.error("saved segment unreadable; starting it empty and leaving the file in place", metadata: [
                "segment": "\(segment.name)", "error": "\(failure)"])
        } catch {
            do {
                let aside = try archive.reject(segment.name)
                logger.error("saved segment rejected; starting it empty", metadata: [
                    "segment": "\(segment.name)", "error": "\(error)", "movedTo": "\(aside)"])
            } catch let moveError {
                logger.error("saved segment rejected; starting it empty", metadata: [
                    "segment": "\(segment.name)", "error": "\(error)", "moveAside": "\(moveError)"])
            }
        }
    }

    /// Saves persistent segments whose version changed since their last successful save: the
    /// snapshot is taken here (a verified read), the file written on the persistence queue, or
    /// right here when `synchronously` (on stop). A version counts as saved only once its file
    /// is written, so a failed save is tried again at the next round, and on stop.
    func savePersistentSegments(synchronously: Bool) {
        let archive = self.archive
        for segment in segments.values where segment.definition.persists {
            let saves = segment.saves
            let version = segment.writer.latestVersion
            guard version != 0, version != saves.savedVersion.load(ordering: .acquiring),
                  !saves.inFlight.load(ordering: .acquiring) else { continue }
            guard let reader = try? SegmentReader(region: segment.writer.region), let snapshot = try? reader.read() else { continue }
            saves.inFlight.store(true, ordering: .releasing)
            let logger = self.logger, name = segment.name
            let work: @Sendable () -> Void = {
                defer { saves.inFlight.store(false, ordering: .releasing) }
                do {
                    try archive.save(name, snapshot)
                    saves.savedVersion.store(snapshot.version, ordering: .releasing)
                    let failed = saves.failures.exchange(0, ordering: .relaxed)
                    if failed > 0 {
                        logger.notice("persistent segment saved again", metadata: [
                            "segment": "\(name)", "version": "\(snapshot.version)", "failedAttempts": "\(failed)"])
                    }
                } catch {
                    // Logged on the first failure and then every tenth, with the count; retried
                    // every round.
                    let failed = saves.failures.wrappingIncrementThenLoad(ordering: .relaxed)
                    if failed == 1 || failed % 10 == 0 || synchronously {
                        logger.error("saving a persistent segment failed; it will be retried", metadata: [
                            "segment": "\(name)", "version": "\(snapshot.version)", "error": "\(error)",
                            "failedAttempts": "\(failed)"])
                    }
                }
            }
            if synchronously { work() } else { persistenceQueue.async(execute: work) }
        }
    }

    /// Puts a segment's memfd and wait board in systemd's fd store, so a restart keeps both.
    func storeInSystemd(_ segment: ManagedSegment) {
        notifier.store(segment.memoryFile, name: segment.storeName)
        notifier.store(segment.boardFile, name: segment.boardStoreName)
    }

    func listen() throws {
        if let adopted = inherited.listener {
            inherited.listener = nil
            try epoll.add(adopted, events: .readable, token: Token.listener)
            listener = adopted
            logger.info("using the listening socket passed by systemd")
            return
        }
        let settings = configuration.socket
        do {
            try FileSystem.createDirectory(FileSystem.split(settings.path).directory, permissions: 0o755)
            // Something other than a socket at the path: say what it is (binding would only
            // report EADDRINUSE, which reads as "another daemon").
            if let existing = try FileSystem.entry(at: settings.path), !existing.isSocket {
                let kind = existing.isSymbolicLink && !FileSystem.existsFollowingLinks(settings.path)
                    ? "a dangling symbolic link" : existing.kindDescription
                throw DaemonError.notASocket(settings.path, kind)
            }
        } catch let error as FileSystemError {
            throw DaemonError.cannotListen(settings.path, "\(error)")
        }
        let fd: FileDescriptor
        do {
            fd = try SeqpacketSocket.listen(path: settings.path)
        } catch Errno.addressInUse {
            throw DaemonError.socketInUse(settings.path)
        } catch {
            throw DaemonError.cannotListen(settings.path, "\(error)")
        }
        ownsSocketPath = true
        do {
            try FileSystem.setPermissions(settings.path, mode_t(settings.mode))
        } catch {
            logger.warning("cannot set socket mode", metadata: ["path": "\(settings.path)", "error": "\(error)"])
        }
        if settings.owner != nil || settings.group != nil {
            do {
                try FileSystem.setOwner(settings.path, user: settings.owner, group: settings.group)
            } catch {
                throw DaemonError.socketOwnership(settings.path, error.errno ?? .ioError)
            }
        }
        try epoll.add(fd, events: .readable, token: Token.listener)
        listener = fd
    }

    /// Runs the loop until SIGTERM or SIGINT, then says STOPPING=1 and closes everything.
    public func run() throws {
        loopRunning.store(true, ordering: .releasing)
        defer {
            loopRunning.store(false, ordering: .releasing)
            runTasks()  // anything posted while the loop was ending
        }
        while running {
            let ready = try epoll.wait(timeoutMilliseconds: activeRings.isEmpty ? -1 : 0)
            let turnStarted = Clock.monotonicNanoseconds()
            defer { metrics.loopTurn(nanoseconds: Clock.monotonicNanoseconds() &- turnStarted) }
            for (token, events) in ready {
                switch token {
                case Token.listener: acceptClients()
                case Token.signals: handleSignals()
                case Token.timer: handleTimer()
                case Token.wakeup: handleWakeup()
                case Token.firstRing...: handleDoorbell(token)
                default: handleClient(token, events: events)
                }
            }
            if !activeRings.isEmpty { drainActiveRings() }
        }
        shutDown()
    }

    func shutDown() {
        stopping.store(true, ordering: .releasing)
        notifier.stopping(status: "stopping: closing \(clients.count) clients")
        // Saves in flight finish first; then every changed persistent segment is saved, here.
        persistenceQueue.sync {}
        savePersistentSegments(synchronously: true)
        for owned in ownedSegments { owned.exclusively { owned.bind(writer: nil, signals: nil) } }
        logger.info("stopping", metadata: ["clients": "\(clients.count)", "publishes": "\(totalPublishes)"])
        for client in clients.values { disconnect(client, reason: nil) }
        refusedSockets.forEach { closeRefused($0.socket) }
        refusedSockets.removeAll()
        if let listener {
            epoll.remove(listener)
            listener.closeQuietly()
            if ownsSocketPath { FileSystem.remove(configuration.socket.path) }
        }
        listener = nil
    }

    func handleSignals() {
        for signal in signals?.drain() ?? [] {
            switch signal {
            case SIGTERM, SIGINT:
                logger.notice("received \(signal == SIGTERM ? "SIGTERM" : "SIGINT"), shutting down")
                running = false
            case SIGHUP:
                reload()
            case SIGUSR2 where allowDebugHang:
                logger.warning("SIGUSR2 with --debug-allow-hang: hanging the event loop to test the watchdog")
                CurrentProcess.sleepForever()
            case SIGUSR2:
                logger.notice("ignoring SIGUSR2 (only --debug-allow-hang makes it hang the loop)")
            default:
                break
            }
        }
    }

    func handleTimer() {
        _ = timer?.acknowledge()
        let now = Clock.monotonicNanoseconds()
        if now &- lastStatusUpdate >= Self.statusInterval {
            // Keep `systemctl status` current; only changes are sent.
            lastStatusUpdate = now
            let line = statusLine()
            if line != lastStatusLine {
                lastStatusLine = line
                notifier.status(line)
            }
        }
        if let suppressed = refusalLog.takeSuppressed(now: now) {
            logger.warning("clients refused, not logged one by one", metadata: ["suppressed": "\(suppressed)"])
        }
        refusedSockets.removeAll { entry in
            guard now >= entry.closeAfter else { return false }
            closeRefused(entry.socket)
            return true
        }
        resumeListener()
        if let interval = watchdogIntervalNanoseconds, now &- lastWatchdogPing >= interval / 2 {
            // Sent from the loop itself: if the loop hangs, the pings stop and systemd steps in.
            notifier.watchdogAlive()
            lastWatchdogPing = now
        }
        announceOwnedSegments(onlyPending: false)
        if configuration.metrics.textfile != nil, now &- lastMetricsWrite >= UInt64(configuration.metrics.intervalSeconds * 1e9) {
            lastMetricsWrite = now
            writeMetricsTextfile()
        }
        if now &- lastPersistenceRound >= UInt64(configuration.persistence.intervalSeconds * 1e9) {
            lastPersistenceRound = now
            savePersistentSegments(synchronously: false)
        }
        for segment in segments.values {
            let latest = segment.writer.latestVersion
            if latest != segment.versionAtLastBackstop {
                segment.versionAtLastBackstop = latest
                segment.writer.wakeAllWaiters()
            }
        }
        let stallLimit = UInt64(configuration.limits.subscriberStallTimeoutSeconds * 1e9)
        for client in Array(clients.values) {
            if let since = client.stalledSince, now &- since >= stallLimit {
                counters.slowSubscribersDisconnected += 1
                for name in client.subscriptions { segments[name]?.slowSubscribersDropped += 1 }
                disconnect(client, reason: "socket stayed full for \(configuration.limits.subscriberStallTimeoutSeconds)s")
            }
        }
    }

    // MARK: Segments

    func addSegment(_ segment: ManagedSegment) {
        segments[segment.name] = segment
        segmentOrder.append(segment.name)
    }

    func retireSegment(named name: String) {
        guard let segment = segments.removeValue(forKey: name) else { return }
        segmentOrder.removeAll { $0 == name }
        if let owned = segment.owner {
            owned.exclusively { owned.bind(writer: nil, signals: nil) }
            logger.notice("owned segment removed from the config; its publishes now fail", metadata: ["segment": "\(name)"])
        }
        segment.retire()
        notifier.removeStored(name: segment.storeName)
        notifier.removeStored(name: segment.boardStoreName)
        let event = ServerMessage.retiredEvent(segment: name).encode(requestID: 0)
        for id in segment.subscribers.union(segment.readers) {
            guard let client = clients[id] else { continue }
            client.subscriptions.remove(name)
            client.opened.remove(name)
            client.removePending(name)
            send(event, to: client)
        }
    }

    /// SIGHUP: re-reads the config. New segments appear, removed ones are retired, unchanged
    /// ones keep their content and version; an invalid file leaves everything as it was.
    func reload() {
        guard !configPath.isEmpty else {
            logger.notice("SIGHUP ignored: the configuration was built in code, there is no file to re-read")
            return
        }
        notifier.reloading(status: "reloading \(configPath)")
        logger.notice("reloading configuration", metadata: ["path": "\(configPath)"])
        let newConfiguration: BrokerConfiguration
        do {
            newConfiguration = try BrokerConfiguration.load(path: configPath)
        } catch {
            counters.failedReloads += 1
            for problem in error.problems { logger.error("config rejected: \(problem)") }
            logger.error("reload failed; keeping the running configuration", metadata: ["problems": "\(error.problems.count)"])
            notifier.ready(status: "reload failed (\(error.problems.count) problems, see journal); " + statusLine())
            return
        }
        if newConfiguration.socket != configuration.socket {
            logger.warning("socket settings changed; they take effect on restart")
        }
        do {
            try checkDescriptorBudget(newConfiguration, context: "reload")
        } catch {
            counters.failedReloads += 1
            logger.error("reload rejected; keeping the running configuration", metadata: ["error": "\(error)"])
            notifier.ready(status: "reload failed (\(error)); " + statusLine())
            return
        }
        var created: [ManagedSegment] = []
        do {
            try MemoryBudget.check(newConfiguration.segments.filter { segments[$0.name]?.definition.layout != $0.layout })
            for definition in newConfiguration.segments {
                if let existing = segments[definition.name], existing.definition.layout == definition.layout { continue }
                created.append(try ManagedSegment(creating: definition))
            }
        } catch {
            created.forEach { $0.retire() }
            counters.failedReloads += 1
            logger.error("reload failed creating a segment; keeping the running configuration", metadata: ["error": "\(error)"])
            notifier.ready(status: "reload failed (\(error)); " + statusLine())
            return
        }
        let wanted = Set(newConfiguration.segments.map(\.name))
        for name in segmentOrder where !wanted.contains(name) {
            logger.notice("segment removed", metadata: ["segment": "\(name)"])
            retireSegment(named: name)
        }
        for segment in created {
            if let old = segments[segment.name], let owned = old.owner {
                // The application's publisher moves to the new segment with publishes excluded,
                // so no version lands in the old one after its content was carried over.
                owned.exclusively {
                    carryOver(from: old.writer, to: segment)
                    owned.bind(writer: segment.writer, signals: segment.signals)
                }
                segment.owner = owned
                old.owner = nil
                logger.notice("owned segment resized", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                retireSegment(named: segment.name)
            } else if let old = segments[segment.name] {
                carryOver(from: old.writer, to: segment)
                logger.notice("segment resized", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                retireSegment(named: segment.name)
            } else {
                logger.notice("segment added", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                restoreFromDisk(segment)
            }
            addSegment(segment)
            storeInSystemd(segment)
        }
        for definition in newConfiguration.segments {
            segments[definition.name]?.updateAccess(from: definition)
        }
        segmentOrder = newConfiguration.segments.map(\.name)
        configuration.limits = newConfiguration.limits
        configuration.segments = newConfiguration.segments
        // Rings of removed segments (or of producers no longer allowed) are detached now, with
        // the reason; the others learn their segment's capacity, which may have changed.
        for ring in Array(rings.values) { _ = currentSegment(of: ring) }
        counters.reloads += 1
        notifier.ready(status: statusLine())
        logger.notice("reloaded", metadata: ["segments": "\(segments.count)"])
    }

    /// A resized segment starts over, keeping the old content as its first version when it fits.
    func carryOver(from old: SegmentWriter, to new: ManagedSegment) {
        let reader = try? SegmentReader(region: old.region)
        guard let snapshot = try? reader?.read(), snapshot.bytes.count <= new.definition.capacity else { return }
        _ = try? new.writer.publish(snapshot.bytes)
    }

    func statusLine() -> String {
        "serving \(segments.count) segment\(segments.count == 1 ? "" : "s") to \(clients.count) client\(clients.count == 1 ? "" : "s"); \(totalPublishes) publishes"
    }

    /// Writes the metrics to `metrics.textfile` for node_exporter's textfile collector: a new
    /// file beside it, created exclusively under an unpredictable name, then renamed over it, so
    /// the collector never reads half a file and nothing planted in the directory is followed.
    /// A file every user may read holds only what every user may see.
    func writeMetricsTextfile() {
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
            if metricsWriteFailed { logger.notice("the metrics textfile is written again", metadata: ["path": "\(path)"]) }
            metricsWriteFailed = false
        } catch {
            if !metricsWriteFailed {  // once per failure streak, not every few seconds
                logger.error("cannot write the metrics textfile", metadata: ["path": "\(path)", "error": "\(error)"])
            }
            metricsWriteFailed = true
        }
    }

    /// The metrics in the Prometheus text format, brought up to date first.
    func metricsText(visibleSegments: Set<String>?) -> String {
        let owners = Dictionary(ownedSegments.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
        metrics.refresh(segments: segmentOrder.compactMap { segments[$0] }.map { segment in
            let owner = segment.owner.flatMap { owners[$0.name] }
            return BrokerMetrics.SegmentFigures(
                name: segment.name, publishes: segment.publishes + (owner?.publishCount ?? 0),
                bytes: segment.publishedBytes + (owner?.publishedBytes ?? 0), version: segment.writer.latestVersion,
                readers: segment.readers.count, subscribers: segment.subscribers.count, eventsSent: segment.eventsSent,
                eventsCoalesced: segment.eventsCoalesced, slowDropped: segment.slowSubscribersDropped)
        }, clients: clients.count, accepted: counters.clientsAccepted, refused: counters.clientsRefused)
        return metrics.text(visibleSegments: visibleSegments)
    }

    /// Publishes through the control channel and rings, plus the embedding application's own.
    var totalPublishes: UInt64 {
        ownedSegments.reduce(counters.publishes) { $0 &+ $1.publishCount }
    }

    // MARK: The embedding owner

    /// Makes `owned` the only writer of its segment (on the loop's thread, or before it runs).
    /// What clients' rings still hold is published first; then they are detached.
    func claim(_ owned: OwnedSegment) -> OwnerError? {
        guard let segment = segments[owned.name] else { return .noSuchSegment(owned.name) }
        if segment.owner === owned { return nil }
        for ring in Array(rings.values) where ring.segmentName == owned.name {
            finalDrain(ring)
            removeRing(ring, detachCode: .ownerPublishes)
        }
        owned.exclusively { owned.bind(writer: segment.writer, signals: segment.signals) }
        segment.owner = owned
        segment.lastAnnouncedVersion = segment.writer.latestVersion
        if !ownedSegments.contains(where: { $0 === owned }) { ownedSegments.append(owned) }
        logger.info("segment published by the owner process", metadata: ["segment": "\(owned.name)"])
        return nil
    }

    /// Runs `body` on the loop's thread and returns its result; from any other thread. If the
    /// loop is not running (stopped, or not yet started), `body` runs on the calling thread.
    func runOnLoop(_ body: @escaping (BrokerServer) -> OwnerError?) -> OwnerError? {
        guard loopRunning.load(ordering: .acquiring) else { return body(self) }
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: OwnerError?
        taskLock.lock()
        let id = nextTaskID
        nextTaskID += 1
        tasks.append((id, { server in
            result = body(server)
            done.signal()
        }))
        taskLock.unlock()
        wakeup.ring()
        while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
            guard !loopRunning.load(ordering: .acquiring) else { continue }
            // The loop ended before it took the task: take it back and run it here.
            taskLock.lock()
            let index = tasks.firstIndex { $0.id == id }
            if let index { tasks.remove(at: index) }
            taskLock.unlock()
            if index != nil { return body(self) }
        }
        return result
    }

    func runTasks() {
        taskLock.lock()
        let pending = tasks
        tasks.removeAll()
        taskLock.unlock()
        for task in pending { task.body(self) }
    }

    func handleWakeup() {
        runTasks()
        announceOwnedSegments(onlyPending: true)
    }

    /// Sends VERSION events for versions the application published in-process: for segments it
    /// flagged (`onlyPending`), or, from the timer, for any whose latest version was not yet
    /// announced (a publish that raced a new subscription).
    func announceOwnedSegments(onlyPending: Bool) {
        for owned in ownedSegments {
            guard let segment = segments[owned.name], segment.owner === owned else { continue }
            let flagged = segment.signals.announcePending.exchange(false, ordering: .acquiringAndReleasing)
            guard flagged || !onlyPending, !segment.subscribers.isEmpty,
                  let receipt = segment.writer.latestReceipt, receipt.version > segment.lastAnnouncedVersion else { continue }
            segment.lastAnnouncedVersion = receipt.version
            announce(VersionInfo(receipt), of: segment)
        }
    }

    // MARK: Clients

    func acceptClients() {
        guard let listener, !listenerPaused else { return }
        for _ in 0..<64 {
            let accepted: FileDescriptor?
            do {
                accepted = try SeqpacketSocket.accept(listener)
            } catch {
                if [.tooManyOpenFiles, .tooManyOpenFilesInSystem, .noMemory, .noBufferSpace].contains(error) {
                    pauseListener(reason: error)
                } else {
                    logger.warning("accept failed", metadata: ["error": "\(error)"])
                }
                return
            }
            guard let socket = accepted else { return }
            let credentials: PeerCredentials
            do {
                credentials = try SeqpacketSocket.peerCredentials(socket)
            } catch {
                socket.closeQuietly()
                continue
            }
            if let refusal = admissionRefusal(for: credentials) {
                refuse(socket, credentials: credentials, message: refusal)
                continue
            }
            let client = ClientConnection(id: nextClientID, socket: socket, credentials: credentials)
            nextClientID += 1
            do {
                try epoll.add(socket, events: [.readable, .readHangUp], token: client.id)
            } catch {
                socket.closeQuietly()
                continue
            }
            clients[client.id] = client
            connectionsPerUID[credentials.uid, default: 0] += 1
            counters.clientsAccepted += 1
            logger.debug("client connected", metadata: ["client": "\(client.id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)"])
        }
    }

    /// Why a new connection may not be served, or nil if it may. Root and the daemon's own uid
    /// may use every slot; everyone else leaves `limits.reservedClients` free and holds at most
    /// `limits.maxClientsPerUser`, so no unprivileged user can lock the others (or root) out.
    func admissionRefusal(for peer: PeerCredentials) -> String? {
        let limits = configuration.limits
        if isPrivileged(peer) {
            guard clients.count < limits.maximumClients else {
                return "the daemon serves at most \(limits.maximumClients) clients (limits.maxClients)"
            }
            return nil
        }
        guard clients.count < limits.maximumClients - limits.reservedClients else {
            return "the daemon serves at most \(limits.maximumClients) clients, \(limits.reservedClients) of them kept for root and the daemon's user (limits.maxClients, limits.reservedClients)"
        }
        let held = connectionsPerUID[peer.uid, default: 0]
        guard held < limits.maximumClientsPerUser else {
            return "uid \(peer.uid) already has \(held) connections, the most one user may hold (limits.maxClientsPerUser)"
        }
        return nil
    }

    /// Answers a connection that may not be served with `too-many-clients`, then closes it.
    func refuse(_ socket: FileDescriptor, credentials: PeerCredentials, message: String) {
        counters.clientsRefused += 1
        let refusal = ServerMessage.error(ProtocolError(.tooManyClients, message))
        _ = refusal.encode(requestID: 0).withUnsafeBytes { try? SeqpacketSocket.send(socket, $0) }
        // Closing now, with the client's HELLO unread, would reset the connection and
        // discard the refusal before the client reads it: end our side, close later. Past 256
        // waiting at once, the oldest is closed early; what its client sent is read first, so
        // that closing resets nothing and its refusal still arrives.
        SeqpacketSocket.shutdownWriting(socket)
        if refusedSockets.count >= 256 { closeRefused(refusedSockets.removeFirst().socket) }
        refusedSockets.append((socket, Clock.monotonicNanoseconds() + 1_000_000_000))
        refusalLog.record(uid: credentials.uid, now: Clock.monotonicNanoseconds()) { suppressed in
            logger.warning("client refused", metadata: [
                "uid": "\(credentials.uid)", "pid": "\(credentials.pid)", "reason": "\(message)",
            ].merging(suppressed.map { ["suppressedSinceLastLine": "\($0)"] } ?? [:]) { $1 })
        }
    }

    /// Closes a refused connection without resetting it (which could discard the refusal unread).
    func closeRefused(_ socket: FileDescriptor) {
        SeqpacketSocket.discardPending(socket)
        socket.closeQuietly()
    }

    /// Out of descriptors (or kernel memory): stop watching the listener, so a level-triggered
    /// epoll does not report it ready again at once and spin. Connections wait in the backlog
    /// until a descriptor frees (a client leaves) or the next timer tick retries.
    func pauseListener(reason: Errno) {
        guard let listener, !listenerPaused else { return }
        listenerPaused = true
        epoll.remove(listener)
        acceptPauses += 1
        let now = Clock.monotonicNanoseconds()
        if now &- lastAcceptPauseLog >= 10_000_000_000 {
            lastAcceptPauseLog = now
            let limit = ResourceLimits.openFiles().current.map(String.init) ?? "unlimited"
            logger.error("cannot accept connections: \(reason); waiting until a descriptor frees", metadata: [
                "clients": "\(clients.count)", "segments": "\(segments.count)", "rlimitNofile": "\(limit)",
                "pausesSinceLastLog": "\(acceptPauses)",
            ])
            acceptPauses = 0
        }
    }

    /// Watches the listener again after a pause; queued connections are accepted at once.
    func resumeListener() {
        guard let listener, listenerPaused else { return }
        listenerPaused = false
        do {
            try epoll.add(listener, events: .readable, token: Token.listener)
        } catch {
            listenerPaused = true
            return
        }
        acceptClients()
    }

    func handleClient(_ id: UInt64, events: Epoll.Events) {
        guard let client = clients[id] else { return }
        if events.contains(.writable) {
            flush(client)
            guard clients[id] != nil else { return }
        }
        if events.contains(.readable) || events.contains(.hangUp) || events.contains(.readHangUp) {
            readRequests(from: client)
        }
    }

    func readRequests(from client: ClientConnection) {
        for _ in 0..<64 {
            guard clients[client.id] != nil, !client.hasQueuedReplies else { return }
            let received: ReceivedMessage?
            do {
                received = try SeqpacketSocket.receive(client.socket, into: receiveBuffer, maximumDescriptors: ControlProtocol.maximumDescriptors)
            } catch {
                disconnect(client, reason: "receive failed: \(error)")
                return
            }
            guard let message = received else { return }
            if message.byteCount == 0 && message.descriptors.isEmpty && !message.wasTruncated {
                disconnect(client, reason: nil)
                return
            }
            handleFrame(message, from: client)
        }
    }

    // MARK: Sending

    enum SendOutcome { case sent, full, failed }

    func trySend(_ frame: [UInt8], to client: ClientConnection, descriptors: [FileDescriptor] = []) -> SendOutcome {
        let outcome = frame.withUnsafeBytes { bytes in
            Result { () throws(Errno) in try SeqpacketSocket.send(client.socket, bytes, descriptors: descriptors) }
        }
        switch outcome {
        case .success(let sent):
            return sent ? .sent : .full
        case .failure(let error):
            disconnect(client, reason: error == .brokenPipe || error == .connectionReset ? nil : "send failed: \(error)")
            return .failed
        }
    }

    /// Sends a reply (or a must-deliver event) in order; queues it if the socket is full.
    /// Descriptors are closed once sent (the receiver has its own copies then).
    func send(_ frame: [UInt8], to client: ClientConnection, descriptors: [FileDescriptor] = []) {
        if client.hasQueuedReplies {
            client.enqueue(frame, descriptors: descriptors)
            return
        }
        switch trySend(frame, to: client, descriptors: descriptors) {
        case .sent:
            descriptors.forEach { $0.closeQuietly() }
        case .full:
            client.enqueue(frame, descriptors: descriptors)
            waitForWritable(client)
        case .failed:
            descriptors.forEach { $0.closeQuietly() }
        }
    }

    func waitForWritable(_ client: ClientConnection) {
        if client.stalledSince == nil { client.stalledSince = Clock.monotonicNanoseconds() }
        guard !client.watchingWritable else { return }
        client.watchingWritable = true
        // While replies are queued, stop reading requests: backpressure instead of buffering.
        try? epoll.modify(client.socket, events: [.writable, .readHangUp], token: client.id)
    }

    /// Sends queued replies, then one coalesced event per pending segment (for its latest version).
    func flush(_ client: ClientConnection) {
        var progressed = false
        while let (frame, descriptors) = client.firstQueued {
            switch trySend(frame, to: client, descriptors: descriptors) {
            case .sent:
                client.dequeueSent()
                progressed = true
            case .full:
                if progressed { client.stalledSince = Clock.monotonicNanoseconds() }
                return
            case .failed:
                return
            }
        }
        while let name = client.popPending() {
            guard let receipt = segments[name]?.writer.latestReceipt,
                  client.wantsEvent(for: name, version: receipt.version) else { continue }
            let event = ServerMessage.versionEvent(segment: name, VersionInfo(receipt)).encode(requestID: 0)
            switch trySend(event, to: client) {
            case .sent:
                counters.eventsSent += 1
                segments[name]?.eventsSent += 1
                progressed = true
            case .full:
                client.pushBackPending(name)
                if progressed { client.stalledSince = Clock.monotonicNanoseconds() }
                return
            case .failed:
                return
            }
        }
        client.stalledSince = nil
        client.watchingWritable = false
        try? epoll.modify(client.socket, events: [.readable, .readHangUp], token: client.id)
        readRequests(from: client)
    }

    func disconnect(_ client: ClientConnection, reason: String?) {
        guard clients[client.id] != nil else { return }
        // What a producer appended before it went away is still published.
        for token in client.rings.values {
            guard let ring = rings[token] else { continue }
            finalDrain(ring)
            removeRing(ring, detachCode: nil)
        }
        clients.removeValue(forKey: client.id)
        if let held = connectionsPerUID[client.credentials.uid] {
            connectionsPerUID[client.credentials.uid] = held > 1 ? held - 1 : nil
        }
        epoll.remove(client.socket)
        for name in client.subscriptions { segments[name]?.subscribers.remove(client.id) }
        for name in client.opened { segments[name]?.readers.remove(client.id) }
        client.close()
        if listenerPaused && running { resumeListener() }
        if let reason {
            logger.notice("client disconnected", metadata: ["client": "\(client.id)", "pid": "\(client.credentials.pid)", "reason": "\(reason)"])
        } else {
            logger.debug("client left", metadata: ["client": "\(client.id)"])
        }
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

extension VersionInfo {
    init(_ receipt: PublishReceipt) {
        self.init(version: receipt.version, length: UInt64(receipt.length), crc64: receipt.crc64,
                  publishedAtNanoseconds: receipt.publishedAtNanoseconds)
    }
}
