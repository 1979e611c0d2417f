import CShmBrokerShim
import Glibc
import SystemPackage

/// Runs a raw syscall wrapper that reports failure as `-1` plus `errno`, retrying on `EINTR`.
///
/// Every syscall in shmbroker goes through here (or ``retryingNegatedErrno(_:)``), so that
/// interrupted calls are retried in exactly one place.
@inlinable
public func retryingInterrupts<T: FixedWidthInteger>(_ body: () -> T) throws(Errno) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Errno(rawValue: errno)
        if code == .interrupted { continue }
        throw code
    }
}

/// Like ``retryingInterrupts(_:)`` for wrappers that return `-errno` instead of setting `errno`.
@inlinable
public func retryingNegatedErrno(_ body: () -> Int32) throws(Errno) -> Int32 {
    while true {
        let result = body()
        if result >= 0 { return result }
        let code = Errno(rawValue: -result)
        if code == .interrupted { continue }
        throw code
    }
}

extension FileDescriptor {
    /// Closes the descriptor, ignoring errors: for cleanup paths where nothing useful can be done.
    public func closeQuietly() {
        _ = try? close()
    }

    /// A second descriptor for the same open file description, close-on-exec (`F_DUPFD_CLOEXEC`).
    public func duplicateClosingOnExec() throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try retryingInterrupts { fcntl(rawValue, F_DUPFD_CLOEXEC, 0) })
    }

    /// Marks the descriptor close-on-exec (`FD_CLOEXEC`), for descriptors inherited without it.
    public func setCloseOnExec() throws(Errno) {
        _ = try retryingInterrupts { fcntl(rawValue, F_SETFD, FD_CLOEXEC) }
    }

    /// Makes reads, writes and accepts on the descriptor return `EAGAIN` instead of blocking.
    public func setNonBlocking() throws(Errno) {
        let flags = try retryingInterrupts { fcntl(rawValue, F_GETFL) }
        _ = try retryingInterrupts { fcntl(rawValue, F_SETFL, flags | O_NONBLOCK) }
    }

    /// The descriptor's size in bytes (`fstat`'s `st_size`).
    public func fileSize() throws(Errno) -> Int {
        var info = Glibc.stat()
        _ = try retryingInterrupts { Glibc.fstat(rawValue, &info) }
        return Int(info.st_size)
    }

    /// Sets the file's size (`ftruncate`): grows it with zeros or, unless sealed, shrinks it.
    public func setSize(_ size: Int) throws(Errno) {
        _ = try retryingInterrupts { Glibc.ftruncate(rawValue, off_t(size)) }
    }

    /// Whether the descriptor refers to a regular file (memfds are regular files).
    public func isRegularFile() throws(Errno) -> Bool {
        var info = Glibc.stat()
        _ = try retryingInterrupts { Glibc.fstat(rawValue, &info) }
        return (info.st_mode & S_IFMT) == S_IFREG
    }

    /// Reads exactly `buffer.count` bytes starting at `offset`, or fewer if the file ends first.
    /// - Returns: the number of bytes read.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer, atOffset offset: Int) throws(Errno) -> Int {
        var done = 0
        while done < buffer.count {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n = try retryingInterrupts { Glibc.pread(rawValue, chunk.baseAddress, chunk.count, off_t(offset + done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `bytes` from `offset` on (`pwrite`), looping over short writes.
    public func writeFully(_ bytes: UnsafeRawBufferPointer, atOffset offset: Int = 0) throws(Errno) {
        var done = 0
        while done < bytes.count {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[done...])
            done += try retryingInterrupts { Glibc.pwrite(rawValue, rest.baseAddress, rest.count, off_t(offset + done)) }
        }
    }
}

/// Which CPUs a thread may run on.
public enum CPUAffinity {
    /// Restricts the calling thread to one CPU, for a reader that spins on a version word and
    /// should own a core: unpinned, the scheduler may share that core with the very thread it
    /// waits for, or move it, and a spin then waits for a time slice instead of a cache line.
    ///
    /// - Parameter cpu: the CPU number (0 ..< the number of CPUs this process may use).
    /// - Throws: `Errno.invalidArgument` for a CPU that does not exist or is outside the
    ///   process's allowed set (a cgroup's `cpuset`, `taskset`).
    public static func pinCurrentThread(toCPU cpu: Int) throws(Errno) {
        _ = try retryingInterrupts { shmb_pin_current_thread(Int32(clamping: cpu)) }
    }

    /// The CPU the calling thread last ran on.
    public static func currentCPU() throws(Errno) -> Int {
        Int(try retryingInterrupts { shmb_current_cpu() })
    }
}

/// Clocks used for publish times and deadlines.
public enum Clock {
    /// Wall-clock time in nanoseconds since the Unix epoch (`CLOCK_REALTIME`).
    public static func realtimeNanoseconds() -> UInt64 { shmb_realtime_ns() }
    /// Monotonic time in nanoseconds (`CLOCK_MONOTONIC`), for intervals and deadlines.
    public static func monotonicNanoseconds() -> UInt64 { shmb_monotonic_ns() }
}

/// The calling process: who it runs as, and how its threads give way.
public enum CurrentProcess {
    /// The real user id (`getuid`).
    public static var userID: UInt32 { getuid() }
    /// The process id (`getpid`).
    public static var processID: Int32 { getpid() }
    /// The parent's process id (`getppid`): 1 for a service systemd started.
    public static var parentProcessID: Int32 { getppid() }
    /// Whether the environment has `name` (`getenv`, without copying the environment).
    public static func hasEnvironment(_ name: String) -> Bool { getenv(name) != nil }
    /// The calling thread's identity (`pthread_self`), to check which thread runs some code.
    public static var threadID: UInt { UInt(pthread_self()) }
    /// Lets another thread run (`sched_yield`): for a short wait on another thread's step.
    public static func yieldThread() { _ = sched_yield() }
    /// Blocks the calling thread forever (a debug hang that the watchdog must catch).
    public static func sleepForever() -> Never {
        while true { _ = sleep(3600) }
    }
}

/// Process-wide signal set-up.
public enum ProcessSignals {
    /// Makes writes to a closed socket fail with `EPIPE` instead of killing the process.
    public static func ignoreBrokenPipe() { shmb_ignore_sigpipe() }
}
