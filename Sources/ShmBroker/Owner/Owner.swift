import Atomics
import Foundation
import Synchronization
import Logging
@_exported import ShmBrokerConfig
@_exported import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol

/// An application that *is* the owner of its segments: it creates them from a config, serves
/// readers on the control socket exactly as `shmbrokerd` does (HELLO, OPEN, SUBSCRIBE, STATUS,
/// access lists, events, retirement on reload, sd_notify, the fd store, socket activation), and
/// publishes to them in-process, with no socket hop and no other process in the path.
///
/// ```swift
/// let owner = try ShmBrokerOwner(configPath: "/etc/myapp/shmbroker.json")  // first thing in main
/// let clock = try owner.segment("clock")       // claim it: clients may read, not publish
/// try owner.start()                            // segments exist, socket listens, READY=1
/// try owner.run(every: .seconds(1)) {          // until SIGTERM, SIGINT or stop(); ends cleanly
///     try clock.publish(Array("\(Date())".utf8))
/// }
/// ```
///
/// Threads: the control socket is served by one event-loop thread that ``start()`` creates.
/// ``segment(_:)``, ``start()``, ``stop()`` and ``waitUntilStopped()`` may be called from any
/// thread. Each ``OwnedSegment`` is published from one thread at a time (enforced). With
/// `handlesSignals` (the default) create the owner before any other thread starts: it blocks
/// SIGTERM, SIGINT and SIGHUP so that only its event loop receives them (stop, stop, reload).
public final class ShmBrokerOwner: Sendable {
    /// How the owner fits into its process.
    public struct Options: Sendable {
        /// Take SIGTERM and SIGINT (graceful stop) and SIGHUP (reload the config file). Needs the
        /// owner to be created before any other thread; turn it off in a process that handles
        /// signals itself and calls ``ShmBrokerOwner/stop()``.
        public var handlesSignals = true
        /// Where the owner logs; default: stderr with journald priority prefixes, at `info`.
        public var logger: Logger?
        /// Adopt descriptors systemd passes (`LISTEN_FDS`): the listening socket and stored segments.
        public var adoptsSystemdDescriptors = true
        /// The name HELLO and STATUS report beside the version; default: the process's name.
        public var name: String
        /// Whether the owner speaks to systemd itself: READY=1 from ``ShmBrokerOwner/start()``,
        /// STATUS, the watchdog, STOPPING, the fd store. An application that reports its own
        /// state (a mirror, ready only once its first versions arrived) turns it off and sends
        /// those itself, so that the two never contradict each other.
        public var reportsToSystemd = true

        public init(handlesSignals: Bool = true, logger: Logger? = nil, adoptsSystemdDescriptors: Bool = true, name: String? = nil) {
            self.handlesSignals = handlesSignals
            self.logger = logger
            self.adoptsSystemdDescriptors = adoptsSystemdDescriptors
            self.name = name ?? ProcessInfo.processInfo.processName
        }
    }

    /// The server, reached on its loop's thread only.
    let server: LoopBound<BrokerServer>
    /// The server's stop flag, read from any thread.
    private let stopping: ManagedAtomic<Bool>
    private let logger: Logger
    /// The segments claimed so far, and whether ``start()`` ran.
    private let state = Mutex<(claims: [String: OwnedSegment], started: Bool)>(([:], false))
    private let finished = DispatchSemaphore(value: 0)
    private let stoppedFlag = ManagedAtomic<Bool>(false)

    /// Prepares an owner for a validated configuration; nothing is created until ``start()``.
    ///
    /// - Parameters:
    ///   - configuration: segments, socket and limits, from a file or built in code.
    ///   - configPath: the file SIGHUP re-reads; nil when the configuration was built in code.
    ///   - options: signals, logging, systemd descriptors.
    public init(configuration: BrokerConfiguration, configPath: String? = nil, options: Options = Options()) throws(OwnerError) {
        // Built in code or read from a file, a configuration passes the same checks.
        let configuration = try Self.check(configuration, from: configPath)
        ProcessSignals.ignoreBrokenPipe()
        let signals: SignalDescriptor?
        if options.handlesSignals {
            do {
                signals = try SignalDescriptor(signals: [SIGTERM, SIGINT, SIGHUP])
            } catch {
                throw .startFailed("cannot create a signalfd: \(error)")
            }
        } else {
            signals = nil
        }
        let logger = options.logger ?? Logger(label: "shmbroker-owner") { JournalLogHandler(label: $0) }
        let server: BrokerServer
        do {
            server = try BrokerServer(configuration: configuration, configPath: configPath ?? "", signals: signals, logger: logger,
                                      notifier: SystemdNotifier(silent: !options.reportsToSystemd),
                                      inherited: options.adoptsSystemdDescriptors ? InheritedDescriptors.takeFromSystemd() : InheritedDescriptors(),
                                      ownerName: options.name)
        } catch {
            throw .startFailed("\(error)")
        }
        self.server = LoopBound(server, loop: server.loop)
        self.stopping = server.stopping
        self.logger = logger
    }

    private static func check(_ configuration: BrokerConfiguration, from path: String?) throws(OwnerError) -> BrokerConfiguration {
        guard path == nil else { return configuration }  // a file was checked as it was read
        do {
            return try configuration.validated()
        } catch {
            throw .invalidConfiguration(error.description)
        }
    }

    /// Loads and validates a config file (the same JSON format `shmbrokerd` reads).
    ///
    /// - Throws: ``OwnerError/invalidConfiguration(_:)`` listing every problem with its JSON path.
    public convenience init(configPath: String, options: Options = Options()) throws(OwnerError) {
        let absolute = URL(fileURLWithPath: configPath).standardizedFileURL.path
        let configuration: BrokerConfiguration
        do {
            configuration = try BrokerConfiguration.load(path: absolute)
        } catch {
            throw .invalidConfiguration(error.description)
        }
        try self.init(configuration: configuration, configPath: absolute, options: options)
    }

    /// Claims a configured segment for in-process publishing. From then on the owner is its only
    /// writer: clients' PUBLISH and ATTACH_RING are refused with `owner-publishes`. Claim before
    /// ``start()`` to refuse them from the first moment; a claim after it first publishes what
    /// clients' publish rings still hold, then detaches them.
    ///
    /// - Parameter name: a segment of the configuration.
    /// - Returns: the handle to publish with; the same handle for the same name.
    public func segment(_ name: String) throws(OwnerError) -> OwnedSegment {
        let (owned, isStarted) = try state.withLock { state throws(OwnerError) in
            if let existing = state.claims[name] { return (existing, false) }
            // The configuration is the loop's (a SIGHUP reload replaces it there): ask the loop,
            // which runs this here before it starts and after it ended.
            guard server.submit({ $0.configuration.segments.contains(where: { $0.name == name }) }) else {
                throw .noSuchSegment(name)
            }
            let owned = OwnedSegment(name: name, doorbell: server.loop.doorbell)
            state.claims[name] = owned
            return (owned, state.started)
        }
        if isStarted, let failure = server.submit({ $0.claim(owned) }) { throw failure }
        return owned
    }

    /// Creates (or takes back from systemd's fd store) every segment, binds the claimed ones,
    /// listens on the control socket, sends READY=1 (with ``Options/reportsToSystemd``), and
    /// starts the event-loop thread.
    public func start() throws(OwnerError) {
        try state.withLock { state throws(OwnerError) in
            guard !state.started else { return }
            let claims = Array(state.claims.values)
            // The loop is not running yet: this runs here.
            let outcome = server.submit { server in Result { try server.start(claims: claims) } }
            do {
                try outcome.get()
            } catch let error as OwnerError {
                throw error
            } catch {
                throw .startFailed("\(error)")
            }
            state.started = true
            startLoopThread()
        }
    }

    private func startLoopThread() {
        let thread = Thread { [self] in
            server.becomingTheLoop { server in
                do {
                    try server.run()
                } catch {
                    logger.critical("event loop failed: \(error)")
                    server.shutDown()
                }
            }
            stoppedFlag.store(true, ordering: .releasing)
            finished.signal()
        }
        thread.name = "shmbroker-owner-loop"
        thread.start()
    }

    /// Whether the event loop has stopped (after SIGTERM, SIGINT or ``stop()``).
    public var isStopped: Bool { stoppedFlag.load(ordering: .acquiring) }

    /// Blocks until the event loop stops: after SIGTERM or SIGINT (with `handlesSignals`) or ``stop()``.
    public func waitUntilStopped() {
        guard state.withLock({ $0.started }), !isStopped else { return }
        finished.wait()
        finished.signal()  // let every other waiter through too
    }

    /// Runs `body` (typically a publish) every `interval` until the owner stops (SIGTERM, SIGINT
    /// or ``stop()``), then waits until the stop is complete. A publish that fails because the
    /// owner stopped meanwhile ends the loop cleanly, so a stop never surfaces as an error; any
    /// other error stops the owner and is rethrown.
    ///
    /// ```swift
    /// try owner.start()
    /// try owner.run(every: .seconds(1)) {
    ///     try clock.publish(Array("\(Date())".utf8))
    /// }
    /// ```
    ///
    /// - Parameters:
    ///   - interval: the time from one call's start to the next (a call that takes longer is
    ///     followed by the next at once); `.zero` publishes flat out.
    ///   - body: the work of one round, on the calling thread.
    public func run(every interval: Duration, _ body: () throws -> Void) throws {
        let nanoseconds = UInt64(clamping: interval.components.seconds) &* 1_000_000_000
            &+ UInt64(clamping: interval.components.attoseconds / 1_000_000_000)
        while !isStopped {
            let started = DispatchTime.now().uptimeNanoseconds
            do {
                try body()
            } catch OwnerError.retired where stopping.load(ordering: .acquiring) {
                break
            } catch {
                if stopping.load(ordering: .acquiring) { break }
                stop()
                throw error
            }
            let next = DispatchTime(uptimeNanoseconds: started &+ nanoseconds)
            if nanoseconds > 0, DispatchTime.now() < next, finished.wait(timeout: next) == .success {
                finished.signal()  // stopped while waiting; let other waiters through
                break
            }
        }
        waitUntilStopped()
    }

    /// Re-reads the configuration file, as SIGHUP does (for an application that handles signals
    /// itself): segments added, resized or removed, access lists updated; an invalid file leaves
    /// everything as it was. Runs on the event loop and returns when the reload is done.
    public func reload() {
        server.submit { $0.reload() }
    }

    /// Stops serving: sends STOPPING=1, closes every client and the socket. Segment memory stays
    /// valid for readers that mapped it; owned segments refuse further publishes.
    public func stop() {
        guard state.withLock({ $0.started }), !isStopped else { return }
        server.submit { $0.stopping.store(true, ordering: .releasing) }
        waitUntilStopped()
    }

    deinit {
        stop()
    }
}

/// A segment the owner publishes in-process.
///
/// `publish` copies and checksums straight into the segment's next slot and wakes readers
/// blocked on its futex from the calling thread; subscribers' VERSION events go out from the
/// event loop afterwards, without delaying the call (one wake-up of the loop per burst, so
/// events may skip versions when publishes come faster than the loop sends, always carrying the
/// latest). One thread at a time may publish to a segment: a second concurrent call fails with
/// ``OwnerError/concurrentPublish(_:)`` instead of corrupting the slot.
///
/// Why `@unchecked`: the publish path's exclusion is its own (`access`, one compare-and-swap per
/// publish, then unretained references), which the compiler cannot see; a `Mutex` would add a
/// second atomic and the reference counting the unretained pair avoids. Every mutable property
/// changes only inside `exclusively`, and CI runs the owner tests under ThreadSanitizer.
public final class OwnedSegment: @unchecked Sendable {
    /// The segment's name.
    public let name: String

    /// 0: idle, 1: a publish is running, 2: the event loop is swapping or retiring the target.
    private let access = ManagedAtomic<Int>(0)
    private var writer: SegmentWriter?
    private var signals: SegmentSignals?
    /// The same two references, unretained, for the publish path: `writer` and `signals` keep
    /// them alive, and they change only while publishes are excluded (``bind(writer:signals:)``),
    /// so a publish may use them without the reference counting a strong copy costs (two atomic
    /// increments and decrements per publish, about a fifth of a 64-byte publish).
    private var unretainedWriter: Unmanaged<SegmentWriter>?
    private var unretainedSignals: Unmanaged<SegmentSignals>?
    private let doorbell: Doorbell
    private let publishes = ManagedAtomic<UInt64>(0)
    private let bytes = ManagedAtomic<UInt64>(0)

    init(name: String, doorbell: Doorbell) {
        self.name = name
        self.doorbell = doorbell
    }

    /// Publishes `bytes` as the next version.
    ///
    /// - Returns: the new version, its length, CRC-64 and publish time.
    /// - Throws: ``OwnerError/payloadTooLarge(segment:length:capacity:)`` (nothing written),
    ///   ``OwnerError/retired(_:)`` after the segment left the config or the owner stopped,
    ///   ``OwnerError/concurrentPublish(_:)``.
    @discardableResult
    public func publish(_ bytes: UnsafeRawBufferPointer) throws(OwnerError) -> PublishReceipt {
        let writer = try enter()
        defer { leave() }
        let outcome = writer._withUnsafeGuaranteedRef { writer -> Result<PublishReceipt, OwnerError> in
            do throws(SegmentError) {
                return .success(try writer.publish(bytes, source: .local))
            } catch {
                return .failure(.payloadTooLarge(segment: name, length: bytes.count, capacity: writer.layout.capacity))
            }
        }
        let receipt = try outcome.get()
        announce(length: receipt.length)
        return receipt
    }

    /// Publishes a byte array as the next version (see ``publish(_:)-(UnsafeRawBufferPointer)``).
    @discardableResult
    public func publish(_ bytes: [UInt8]) throws(OwnerError) -> PublishReceipt {
        let outcome = bytes.withUnsafeBytes { buffer in Result { () throws(OwnerError) in try publish(buffer) } }
        return try outcome.get()
    }

    /// Publishes the next version by letting `fill` write it straight into the slot: zero-copy.
    /// The CRC is computed over the slot after `fill` returns.
    ///
    /// - Parameters:
    ///   - length: the payload's length, checked against the capacity before anything is touched.
    ///   - fill: writes exactly `length` bytes into the buffer it gets. If it throws, readers keep
    ///     the previous version and the error is rethrown.
    @discardableResult
    public func publish(length: Int, _ fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> PublishReceipt {
        try publishFilling(length: length) { writer throws(PublishFailure<AnyFillError>) in
            try writer.publish(length: length) { (buffer: UnsafeMutableRawBufferPointer) throws(AnyFillError) in
                do { try fill(buffer) } catch { throw AnyFillError(error: error) }
            }
        }
    }

    /// Publishes the next version by letting `fill` write it into the slot one block at a time,
    /// in order: each block is checksummed right after `fill` returns, while it is still in cache,
    /// so a large version costs one pass over memory (``publish(length:_:)`` checksums the slot
    /// after the fill, a second pass once the version outgrows the cache).
    ///
    /// ```swift
    /// try frames.publish(length: frame.count) { block, offset in
    ///     decoder.decode(into: block, at: offset)   // 16 KiB at a time
    /// }
    /// ```
    ///
    /// - Parameters:
    ///   - length: the payload's length, checked against the capacity before anything is touched.
    ///   - fill: writes the block it gets, which starts `offset` bytes into the payload (blocks of
    ///     the segment's checksum block size, 16 KiB; the last may be shorter). If it throws,
    ///     readers keep the previous version and the error is rethrown.
    @discardableResult
    public func publish(length: Int, fillingBlocks fill: (_ block: UnsafeMutableRawBufferPointer, _ offset: Int) throws -> Void) throws -> PublishReceipt {
        try publishFilling(length: length) { writer throws(PublishFailure<AnyFillError>) in
            try writer.publish(length: length, fillingBlocks: { (block: UnsafeMutableRawBufferPointer, offset: Int) throws(AnyFillError) in
                do { try fill(block, offset) } catch { throw AnyFillError(error: error) }
            })
        }
    }

    /// The frame of the publishes whose caller fills the slot: holds the segment, runs `publish`
    /// on the writer, maps a refusal to ``OwnerError`` and rethrows the fill's own error, then
    /// announces the version.
    private func publishFilling(
        length: Int, _ publish: (SegmentWriter) throws(PublishFailure<AnyFillError>) -> PublishReceipt
    ) throws -> PublishReceipt {
        let writer = try enter()
        defer { leave() }
        let outcome = writer._withUnsafeGuaranteedRef { writer -> Result<PublishReceipt, any Error> in
            do throws(PublishFailure<AnyFillError>) {
                return .success(try publish(writer))
            } catch {
                switch error {
                case .segment: return .failure(OwnerError.payloadTooLarge(segment: name, length: length, capacity: writer.layout.capacity))
                case .fill(let failure): return .failure(failure.error)
                }
            }
        }
        let receipt = try outcome.get()
        announce(length: receipt.length)
        return receipt
    }

    /// The latest version published (0: never), from any thread — but not from inside a
    /// `publish(length:)` fill closure, which holds the segment (the call would wait for itself).
    public var latestVersion: UInt64 {
        while access.compareExchange(expected: 0, desired: 2, ordering: .acquiring).original != 0 { CurrentProcess.yieldThread() }
        defer { access.store(0, ordering: .releasing) }
        return writer?.latestVersion ?? 0
    }

    /// The segment's capacity in bytes (0 once retired); not from inside a fill closure either.
    public var capacity: Int {
        while access.compareExchange(expected: 0, desired: 2, ordering: .acquiring).original != 0 { CurrentProcess.yieldThread() }
        defer { access.store(0, ordering: .releasing) }
        return writer?.layout.capacity ?? 0
    }

    /// Publishes made through this handle.
    public var publishCount: UInt64 { publishes.load(ordering: .relaxed) }
    /// Bytes published through this handle.
    public var publishedBytes: UInt64 { bytes.load(ordering: .relaxed) }

    func enter() throws(OwnerError) -> Unmanaged<SegmentWriter> {
        while true {
            let (exchanged, original) = access.compareExchange(expected: 0, desired: 1, ordering: .acquiring)
            if exchanged { break }
            if original == 1 { throw .concurrentPublish(name) }
            CurrentProcess.yieldThread()  // the event loop is swapping the segment (a reload): a moment
        }
        guard let unretainedWriter else {
            access.store(0, ordering: .releasing)
            throw .retired(name)
        }
        return unretainedWriter
    }

    func leave() {
        access.store(0, ordering: .releasing)
    }

    /// After a publish: count it, and ask the loop to tell subscribers (once per burst).
    func announce(length: Int) {
        publishes.store(publishes.load(ordering: .relaxed) &+ 1, ordering: .relaxed)  // one writer
        bytes.store(bytes.load(ordering: .relaxed) &+ UInt64(length), ordering: .relaxed)
        guard let unretainedSignals else { return }
        let announce = unretainedSignals._withUnsafeGuaranteedRef { signals in
            signals.subscriberCount.load(ordering: .relaxed) > 0
                && !signals.announcePending.exchange(true, ordering: .acquiringAndReleasing)
        }
        if announce { doorbell.ring() }
    }

    /// Runs `body` on the event loop's thread with every publish excluded (waiting for one in progress).
    func exclusively(_ body: () -> Void) {
        while access.compareExchange(expected: 0, desired: 2, ordering: .acquiring).original != 0 { CurrentProcess.yieldThread() }
        body()
        access.store(0, ordering: .releasing)
    }

    /// Points the handle at a segment's writer (nil: retired). Called with publishes excluded.
    func bind(writer: SegmentWriter?, signals: SegmentSignals?) {
        self.writer = writer
        self.signals = signals
        unretainedWriter = writer.map { Unmanaged.passUnretained($0) }
        unretainedSignals = signals.map { Unmanaged.passUnretained($0) }
    }
}

/// Carries a fill closure's untyped error through ``SegmentWriter``'s typed throws.
struct AnyFillError: Error {
    let error: any Error
}
