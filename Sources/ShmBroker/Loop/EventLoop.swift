import Atomics
import Foundation
import ShmBrokerPlatform
import SystemPackage

/// Something the event loop watches: a listening socket, a client connection, a ring's doorbell,
/// the signalfd. The loop calls ``handle(_:)`` on its own thread when the descriptor is ready.
protocol EventSource: AnyObject {
    func handle(_ events: Epoll.Events)
}

/// An ``EventSource`` that runs a closure: for the sources that are no more than a callback.
final class CallbackSource: EventSource {
    private let body: (Epoll.Events) -> Void
    init(_ body: @escaping (Epoll.Events) -> Void) { self.body = body }
    func handle(_ events: Epoll.Events) { body(events) }
}

/// The registration of one source: what ``EventLoop/modify(_:events:)`` and
/// ``EventLoop/deregister(_:)`` take.
struct EventRegistration: Hashable {
    fileprivate let token: UInt64
    fileprivate let descriptor: FileDescriptor

    static func == (lhs: Self, rhs: Self) -> Bool { lhs.token == rhs.token }
    func hash(into hasher: inout Hasher) { hasher.combine(token) }
}

/// The owner's single-threaded event loop: one epoll over registered sources, periodic jobs on a
/// timer, a doorbell through which other threads post work (``submit(_:)``), and work deferred
/// to the end of the current turn. It knows nothing of segments or clients: the composition
/// root (``BrokerServer``) registers what it serves.
///
/// Everything registered runs on the loop's thread; entry points that must only run there call
/// ``assertOnLoop()``, which traps in debug builds when called from another thread.
final class EventLoop: @unchecked Sendable {
    // @unchecked: everything below but `posted`, `isLooping` and `loopThread` is touched only on the
    // loop's thread (asserted); those three are a lock-protected queue and atomics.
    private let epoll: Epoll
    /// Rung by other threads after posting work; watched edge-triggered and never read.
    let doorbell: Doorbell
    private var sources: [UInt64: EventSource] = [:]
    private var nextToken: UInt64 = 1
    private var jobs: [PeriodicJob] = []
    private var timer: PeriodicTimer?
    private var endOfTurn: [() -> Void] = []
    /// Work that wants the loop to look again without sleeping (publish rings with entries left).
    private var pollers: [() -> Bool] = []
    private let postedLock = NSLock()
    private var posted: [(id: UInt64, body: () -> Void)] = []
    private var nextPostID: UInt64 = 0
    /// Whether work posted from other threads goes to the loop: from ``acceptWork()`` (the
    /// server started) until ``run(while:onTurn:)`` ends.
    let isLooping = ManagedAtomic<Bool>(false)
    private let loopThread = ManagedAtomic<UInt>(0)

    /// A job that runs on the loop's timer every `interval`.
    private struct PeriodicJob {
        let name: String
        let intervalNanoseconds: UInt64
        var lastRun: UInt64
        let body: (UInt64) -> Void
    }

    init() throws {
        epoll = try Epoll()
        doorbell = try Doorbell()
        let bell = CallbackSource { [unowned self] _ in self.runPosted() }
        _ = try register(doorbell.descriptor, events: [.readable, .edgeTriggered], source: bell)
    }

    // MARK: Sources

    /// Starts watching `descriptor` for `events`, reporting them to `source`. The loop keeps the
    /// source alive until it is deregistered.
    func register(_ descriptor: FileDescriptor, events: Epoll.Events, source: EventSource) throws(Errno) -> EventRegistration {
        let token = nextToken
        try epoll.add(descriptor, events: events, token: token)
        nextToken += 1
        sources[token] = source
        return EventRegistration(token: token, descriptor: descriptor)
    }

    /// Changes the events watched for a registration.
    func modify(_ registration: EventRegistration, events: Epoll.Events) {
        try? epoll.modify(registration.descriptor, events: events, token: registration.token)
    }

    /// Stops watching; the source is released. The descriptor is not closed.
    func deregister(_ registration: EventRegistration) {
        epoll.remove(registration.descriptor)
        sources.removeValue(forKey: registration.token)
    }

    // MARK: Jobs

    /// Runs `body` on the loop every `intervalNanoseconds` (checked on each timer tick), with
    /// the current monotonic time. Jobs run in the order they were added.
    func every(_ intervalNanoseconds: UInt64, _ name: String, _ body: @escaping (UInt64) -> Void) {
        jobs.append(PeriodicJob(name: name, intervalNanoseconds: intervalNanoseconds, lastRun: Clock.monotonicNanoseconds(), body: body))
    }

    /// Starts the timer that drives the jobs, ticking every `tickNanoseconds`.
    func startTimer(tickNanoseconds: UInt64) throws {
        let timer = try PeriodicTimer(intervalNanoseconds: tickNanoseconds)
        _ = try register(timer.descriptor, events: .readable, source: CallbackSource { [unowned self] _ in self.runDueJobs() })
        self.timer = timer
    }

    private func runDueJobs() {
        _ = timer?.acknowledge()
        let now = Clock.monotonicNanoseconds()
        for index in jobs.indices where now &- jobs[index].lastRun >= jobs[index].intervalNanoseconds {
            jobs[index].lastRun = now
            jobs[index].body(now)
        }
    }

    /// Work that runs after every turn while it returns true (more to do): the loop then polls
    /// instead of sleeping. `name` says what it is, at the call site.
    func poll(_ name: String, _ body: @escaping () -> Bool) {
        pollers.append(body)
    }

    /// Runs `body` at the end of the current turn, after every ready source was handled: for
    /// work (closing a connection) that must not happen in the middle of a call chain.
    func deferToEndOfTurn(_ body: @escaping () -> Void) {
        endOfTurn.append(body)
    }

    // MARK: Running

    /// From now on, work posted from other threads waits for the loop (which may start on
    /// another thread a moment later) instead of running on the poster's thread.
    func acceptWork() {
        isLooping.store(true, ordering: .releasing)
    }

    /// Loops until `keepRunning` returns false; `onTurn` gets each turn's duration.
    func run(while keepRunning: () -> Bool, onTurn: (UInt64) -> Void) throws {
        loopThread.store(Self.currentThreadID, ordering: .releasing)
        isLooping.store(true, ordering: .releasing)
        defer {
            isLooping.store(false, ordering: .releasing)
            runPosted()  // anything posted while the loop was ending
        }
        var wantsAnotherLook = false
        while keepRunning() {
            let ready = try epoll.wait(timeoutMilliseconds: wantsAnotherLook ? 0 : -1)
            let started = Clock.monotonicNanoseconds()
            for (token, events) in ready {
                sources[token]?.handle(events)
            }
            wantsAnotherLook = false
            for poller in pollers where poller() { wantsAnotherLook = true }
            finishTurn()
            onTurn(Clock.monotonicNanoseconds() &- started)
        }
    }

    /// Runs the work deferred to the end of the turn (and what that work defers in turn).
    func finishTurn() {
        while !endOfTurn.isEmpty {
            let work = endOfTurn
            endOfTurn.removeAll()
            work.forEach { $0() }
        }
    }

    // MARK: Other threads

    /// Runs `body` on the loop's thread and returns its result; from any other thread. If the
    /// loop is not running (not started, or ended), `body` runs on the calling thread.
    func submit<T>(_ body: @escaping () -> T) -> T {
        guard isLooping.load(ordering: .acquiring), loopThread.load(ordering: .acquiring) != Self.currentThreadID else {
            return body()
        }
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: T?
        postedLock.lock()
        let id = nextPostID
        nextPostID += 1
        posted.append((id, {
            result = body()
            done.signal()
        }))
        postedLock.unlock()
        doorbell.ring()
        while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
            guard !isLooping.load(ordering: .acquiring) else { continue }
            // The loop ended before it took the work: take it back and run it here.
            postedLock.lock()
            let index = posted.firstIndex { $0.id == id }
            if let index { posted.remove(at: index) }
            postedLock.unlock()
            if index != nil { return body() }
        }
        return result!
    }

    /// Work posted from other threads, plus whatever the doorbell's other users need.
    var onDoorbell: () -> Void = {}

    private func runPosted() {
        postedLock.lock()
        let work = posted
        posted.removeAll()
        postedLock.unlock()
        for item in work { item.body() }
        onDoorbell()
    }

    // MARK: Thread checks

    /// Whether the caller may touch loop-only state: it runs on the loop's thread, or the loop
    /// has not run yet (set-up) or has ended (shutdown), when no other thread runs it.
    var isOnLoop: Bool {
        let owner = loopThread.load(ordering: .acquiring)
        return owner == 0 || owner == Self.currentThreadID || !isLooping.load(ordering: .acquiring)
    }

    /// Traps in debug builds when called off the loop's thread while the loop runs.
    func assertOnLoop(file: StaticString = #fileID, line: UInt = #line) {
        assert(isOnLoop, "loop-only state touched from another thread", file: file, line: line)
    }

    private static var currentThreadID: UInt { CurrentProcess.threadID }
}
