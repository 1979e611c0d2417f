import CShmBrokerShim
import Glibc
import SystemPackage

/// An epoll instance whose registrations carry a 64-bit token chosen by the caller.
public final class Epoll {
    public let descriptor: FileDescriptor
    private var tokens = [UInt64](repeating: 0, count: 256)
    private var readyEvents = [UInt32](repeating: 0, count: 256)

    /// Readiness bits, as in `EPOLLIN` and friends.
    public struct Events: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: EPOLLIN.rawValue)
        public static let writable = Events(rawValue: EPOLLOUT.rawValue)
        public static let error = Events(rawValue: EPOLLERR.rawValue)
        public static let hangUp = Events(rawValue: EPOLLHUP.rawValue)
        public static let readHangUp = Events(rawValue: EPOLLRDHUP.rawValue)
        /// Report each new readiness once (`EPOLLET`) instead of while it lasts.
        public static let edgeTriggered = Events(rawValue: EPOLLET.rawValue)
    }

    public init() throws(Errno) {
        descriptor = FileDescriptor(rawValue: try retryingInterrupts { epoll_create1(Int32(EPOLL_CLOEXEC)) })
    }

    deinit { descriptor.closeQuietly() }

    /// Starts watching `fd` for `events`, reporting them with `token`.
    public func add(_ fd: FileDescriptor, events: Events, token: UInt64) throws(Errno) {
        _ = try retryingInterrupts { shmb_epoll_ctl(descriptor.rawValue, EPOLL_CTL_ADD, fd.rawValue, events.rawValue, token) }
    }

    /// Changes the events watched on `fd`.
    public func modify(_ fd: FileDescriptor, events: Events, token: UInt64) throws(Errno) {
        _ = try retryingInterrupts { shmb_epoll_ctl(descriptor.rawValue, EPOLL_CTL_MOD, fd.rawValue, events.rawValue, token) }
    }

    /// Stops watching `fd` (errors ignored: the fd may already be closed).
    public func remove(_ fd: FileDescriptor) {
        _ = shmb_epoll_ctl(descriptor.rawValue, EPOLL_CTL_DEL, fd.rawValue, 0, 0)
    }

    /// Waits for events.
    /// - Parameter timeoutMilliseconds: -1 waits indefinitely.
    /// - Returns: the ready registrations as (token, events) pairs; empty on timeout or `EINTR`.
    public func wait(timeoutMilliseconds: Int32, maximum: Int = 128) throws(Errno) -> [(token: UInt64, events: Events)] {
        let limit = Int32(min(maximum, tokens.count))
        let n = tokens.withUnsafeMutableBufferPointer { t in
            readyEvents.withUnsafeMutableBufferPointer { e in
                shmb_epoll_wait(descriptor.rawValue, t.baseAddress, e.baseAddress, limit, timeoutMilliseconds)
            }
        }
        if n < 0 {
            let code = Errno(rawValue: errno)
            if code == .interrupted { return [] }
            throw code
        }
        return (0..<Int(n)).map { (tokens[$0], Events(rawValue: readyEvents[$0])) }
    }
}

/// A signalfd: signals delivered as readable events instead of asynchronous handlers.
public final class SignalDescriptor {
    public let descriptor: FileDescriptor

    /// Blocks `signals` in the calling thread (and threads created afterwards) and opens a
    /// signalfd for them. Call it before starting any other thread.
    public init(signals: [Int32]) throws(Errno) {
        let raw = try signals.withUnsafeBufferPointer { buffer throws(Errno) in
            try retryingInterrupts { shmb_signalfd_create(buffer.baseAddress, Int32(buffer.count)) }
        }
        descriptor = FileDescriptor(rawValue: raw)
    }

    deinit { descriptor.closeQuietly() }

    /// Drains pending signals, returning their numbers in arrival order.
    public func drain() -> [Int32] {
        var received: [Int32] = []
        while true {
            let signal = shmb_signalfd_read(descriptor.rawValue)
            if signal <= 0 { return received }
            received.append(signal)
        }
    }
}

/// A periodic monotonic timer as a readable descriptor.
public final class PeriodicTimer {
    public let descriptor: FileDescriptor

    public init(intervalNanoseconds: UInt64) throws(Errno) {
        descriptor = FileDescriptor(rawValue: try retryingInterrupts { shmb_timerfd_periodic(intervalNanoseconds) })
    }

    deinit { descriptor.closeQuietly() }

    /// Reads and returns the number of expirations since the last call (0 if none).
    public func acknowledge() -> Int64 { max(0, shmb_timerfd_read(descriptor.rawValue)) }
}

/// Busy-wait helpers.
public enum Spin {
    /// Tells the CPU the caller is spinning (PAUSE on x86-64): no system call.
    @inline(__always)
    public static func relax() { shmb_cpu_relax() }
}

/// Process-shared futex operations on a 32-bit word that lives in a shared mapping.
///
/// Both sides use the non-private operations: a private wait is never woken by a shared wake.
public enum Futex {
    /// The outcome of a wait.
    public enum WaitResult: Sendable {
        /// Woken by a `wake` (or spuriously): re-check the condition.
        case woken
        /// The word no longer held the expected value when the wait began.
        case valueChanged
        /// The timeout elapsed.
        case timedOut
    }

    /// Sleeps while `*word == expected`, at most `timeoutNanoseconds` (nil: no limit).
    public static func wait(
        on word: UnsafePointer<UInt32>, whileEqualTo expected: UInt32, timeoutNanoseconds: UInt64?
    ) -> WaitResult {
        let timeout = timeoutNanoseconds.map { Int64(clamping: $0) } ?? -1
        switch shmb_futex_wait(word, expected, timeout) {
        case 0: return .woken
        case -EAGAIN: return .valueChanged
        case -ETIMEDOUT: return .timedOut
        default: return .woken  // EINTR and the like: the caller re-checks anyway.
        }
    }

    /// Wakes every waiter on `word`.
    @discardableResult
    public static func wakeAll(_ word: UnsafePointer<UInt32>) -> Int32 {
        shmb_futex_wake(word, Int32.max)
    }
}

/// An eventfd used as a doorbell: one side rings it, the other watches it with epoll.
///
/// The watcher registers it edge-triggered and never reads it, so a peer that shares the file
/// (and could make reads block or drain the counter) cannot stall or starve the watcher.
public final class Doorbell: Sendable {
    public let descriptor: FileDescriptor

    /// Creates a non-blocking, close-on-exec eventfd.
    public init() throws(Errno) {
        descriptor = FileDescriptor(rawValue: try retryingInterrupts { eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK)) })
    }

    /// Adds one to the counter, waking an epoll watcher. A full counter (after 2^64 - 2 rings
    /// nobody read) is not an error: the watcher is already due to look.
    public func ring() {
        var one: UInt64 = 1
        _ = try? retryingInterrupts { Glibc.write(descriptor.rawValue, &one, 8) }
    }

    public func close() { descriptor.closeQuietly() }

    /// Whether `fd` is an eventfd (judged by the kernel's name for it in `/proc/self/fd`).
    public static func isEventFD(_ fd: FileDescriptor) -> Bool {
        var buffer = [CChar](repeating: 0, count: 64)
        let count = readlink("/proc/self/fd/\(fd.rawValue)", &buffer, buffer.count - 1)
        guard count > 0 else { return false }
        return String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) == "anon_inode:[eventfd]"
    }
}
