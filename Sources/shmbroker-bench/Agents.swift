import Atomics
import ArgumentParser
import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage

// Processes the benchmark spawns as readers: each prints one JSON line with what it measured.
// Timestamps are CLOCK_MONOTONIC nanoseconds, comparable across processes on one machine.

/// The first 16 bytes of every benchmark payload: when the producer started sending it, and its round.
enum Stamp {
    static func write(_ buffer: inout [UInt8], sentAt: UInt64, round: UInt64) {
        let wallClock = Clock.realtimeNanoseconds()
        buffer.withUnsafeMutableBytes {
            $0.storeBytes(of: sentAt, toByteOffset: 0, as: UInt64.self)
            $0.storeBytes(of: round, toByteOffset: 8, as: UInt64.self)
            // The wall clock too, to compare with the daemon's publish time (also wall clock).
            if $0.count >= 24 { $0.storeBytes(of: wallClock, toByteOffset: 16, as: UInt64.self) }
        }
    }

    static func wallClock(_ buffer: UnsafeRawBufferPointer) -> UInt64 {
        buffer.count >= 24 ? buffer.loadUnaligned(fromByteOffset: 16, as: UInt64.self) : 0
    }

    static func read(_ buffer: UnsafeRawBufferPointer) -> (sentAt: UInt64, round: UInt64) {
        (buffer.loadUnaligned(fromByteOffset: 0, as: UInt64.self), buffer.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    }
}

/// What an agent reports on its last line of output, as JSON: the fields its kind measures.
struct AgentReport: Codable {
    /// Per-round latencies in nanoseconds, by round (latency agents).
    var latencies: [String: UInt64]?
    /// Median producer call -> daemon publish, and daemon publish -> reader holds it (ns).
    var medianToDaemon: UInt64?
    var medianDaemonToReader: UInt64?
    /// Bytes and versions a drain agent received, when it finished, and the CPU it used (ns).
    var bytes: Int?
    var versions: Int?
    var finishedAt: UInt64?
    var cpuNanoseconds: UInt64?

    /// Writes the report as the agent's last line of output.
    func emit() {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        FileHandle.standardOutput.write(((try? encoder.encode(self)) ?? Data("{}".utf8)) + Data([0x0A]))
    }
}

func announceReady() { FileHandle.standardError.write(Data("ready\n".utf8)) }

struct Agent: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reader processes spawned by the benchmark.", shouldDisplay: false,
        subcommands: [SegmentLatency.self, SocketLatency.self, SocketRelay.self, SegmentDrain.self, SocketDrain.self, BlockDrain.self, FutexWaiter.self])
}

/// Waits on the segment's futex, reads each new version verified, records its one-way latency.
struct SegmentLatency: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "segment-latency")
    @Option var socket: String
    @Option var segment: String
    @Option var rounds: UInt64
    @Option(help: "How to wait for each version: futex, spin or events.") var wait: WaitMode = .futex
    @Option(help: "Pin the waiting thread to this CPU (a spinning reader that owns a core).") var pinCPU: Int?

    func run() async throws {
        let rounds = self.rounds  // read the option once, not per wake-up
        var latencies = LatencyLog(rounds: rounds)
        var toDaemon: [UInt64] = [], toReader: [UInt64] = []
        toDaemon.reserveCapacity(Int(rounds))
        toReader.reserveCapacity(Int(rounds))
        // Pinned after the last suspension point, on the thread that then runs the wait loop.
        let pinCPU = self.pinCPU
        try await followSegment(socket: socket, segment: segment, wait: wait, afterReady: {
            if let pinCPU {
                do { try CPUAffinity.pinCurrentThread(toCPU: pinCPU) } catch { FileHandle.standardError.write(Data("cannot pin to CPU \(pinCPU): \(error)\n".utf8)) }
            }
        }) { info, buffer in
            let received = Clock.monotonicNanoseconds()
            let receivedWall = Clock.realtimeNanoseconds()
            let (sentAt, round) = Stamp.read(buffer)
            latencies.record(round: round, latency: received &- sentAt)
            // The split: producer call -> daemon's publish, and daemon's publish -> reader has it.
            let sentWall = Stamp.wallClock(buffer)
            if sentWall > 0 && info.publishedAtNanoseconds >= sentWall && receivedWall >= info.publishedAtNanoseconds {
                toDaemon.append(info.publishedAtNanoseconds - sentWall)
                toReader.append(receivedWall - info.publishedAtNanoseconds)
            }
            return round + 1 < rounds
        }
        AgentReport(latencies: latencies.byRound, medianToDaemon: median(toDaemon), medianDaemonToReader: median(toReader)).emit()
    }
}

/// Per-round latencies kept in a preallocated array, so that recording one costs the same small
/// amount in every agent (no hashing or string building between wake-ups), whatever it measures.
struct LatencyLog {
    private var values: [UInt64]

    init(rounds: UInt64) { values = [UInt64](repeating: .max, count: Int(rounds)) }

    mutating func record(round: UInt64, latency: UInt64) {
        if round < UInt64(values.count) { values[Int(round)] = latency }
    }

    /// The rounds seen, as `"round": latency`.
    var byRound: [String: UInt64] {
        var result: [String: UInt64] = [:]
        for (round, latency) in values.enumerated() where latency != .max { result["\(round)"] = latency }
        return result
    }
}

/// Opens a segment, announces readiness, then hands each new version (read verified into a
/// reusable buffer, woken by the futex) to `body` until it returns false or 10 s pass idle.
func followSegment(socket: String, segment: String, wait: WaitMode = .futex, afterReady: () -> Void = {},
                   _ body: (SegmentReader.CopiedVersion, UnsafeRawBufferPointer) -> Bool) async throws {
    let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "bench-reader")
    let handle = try await client.open(segment)
    var buffer = [UInt8](repeating: 0, count: handle.capacity)
    var last = handle.latestVersion
    if wait == .events {
        // Woken by VERSION events over the socket, then read from memory.
        let events = try await client.subscribe(segment)
        announceReady()
        afterReady()
        for await event in events {
            guard case .version(let announced) = event, announced.version > last else { continue }
            let outcome = try buffer.withUnsafeMutableBytes { try handle.reader.readOnce(into: $0) }
            guard case .copied(let info) = outcome else { continue }
            last = info.version
            guard buffer.withUnsafeBytes({ body(info, $0) }) else { return }
        }
        return
    }
    let strategy: SegmentReader.WaitStrategy = wait == .spin ? .spin : .futex
    announceReady()
    afterReady()
    while true {
        if handle.waitForVersion(after: last, timeoutNanoseconds: 10_000_000_000, strategy: strategy) == last { return }
        let outcome = try buffer.withUnsafeMutableBytes { try handle.reader.readOnce(into: $0) }
        guard case .copied(let info) = outcome else { continue }
        last = info.version
        guard buffer.withUnsafeBytes({ body(info, $0) }) else { return }
    }
}

/// How a reader agent waits for versions.
enum WaitMode: String, ExpressibleByArgument, CaseIterable {
    /// Sleeps on the segment's futex word.
    case futex
    /// Busy-polls the version word (a core stays busy).
    case spin
    /// Follows VERSION events over the control socket.
    case events
}

/// Reads fixed-size messages from a Unix stream socket, recording each one's one-way latency.
struct SocketLatency: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "socket-latency")
    @Option var path: String
    @Option var size: Int
    @Option var rounds: UInt64

    func run() throws {
        let fd = try RawStream.connect(path)
        let rounds = self.rounds
        var buffer = [UInt8](repeating: 0, count: size)
        var latencies = LatencyLog(rounds: rounds)
        announceReady()
        for _ in 0..<rounds {
            guard RawStream.readExactly(fd, &buffer) else { break }
            let received = Clock.monotonicNanoseconds()
            let (sentAt, round) = buffer.withUnsafeBytes { Stamp.read($0) }
            latencies.record(round: round, latency: received &- sentAt)
        }
        AgentReport(latencies: latencies.byRound).emit()
    }
}

/// Forwards fixed-size messages from one Unix stream socket to another: a broker process between
/// writer and reader, with nothing but two socket hops. The ring path's floor on a machine where
/// each wake-up is what costs.
struct SocketRelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "socket-relay")
    @Option(help: "The writer's listening socket to connect to.") var upstream: String
    @Option(help: "Where to listen for the one reader.") var downstream: String
    @Option var size: Int
    @Option var rounds: UInt64

    func run() throws {
        let listener = try RawStream.listen(downstream)
        let input = try RawStream.connect(upstream)
        let output = accept(listener, nil, nil)
        guard output >= 0 else { throw Errno(rawValue: errno) }
        var buffer = [UInt8](repeating: 0, count: size)
        announceReady()
        for _ in 0..<rounds {
            guard RawStream.readExactly(input, &buffer) else { break }
            buffer.withUnsafeBytes { RawStream.writeAll(output, $0) }
        }
        close(output)
        close(listener)
        unlink(downstream)
        AgentReport().emit()
    }
}

/// Reads every new version it can until `until`, counting the verified bytes it received.
struct SegmentDrain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "segment-drain")
    @Option var socket: String
    @Option var segment: String
    @Option var until: UInt64
    @Flag(help: "Verify each version in place (zero-copy borrow) instead of copying it out.") var zeroCopy = false
    @Option(help: "With --zero-copy: spin this many µs for each version before sleeping on the futex (0: sleep at once).")
    var spinMicroseconds: UInt64 = 0

    func run() async throws {
        var bytes = 0, versions = 0
        var cpuAtReady: UInt64 = 0
        if zeroCopy {
            let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "bench-reader")
            let handle = try await client.open(segment)
            var last = handle.latestVersion
            let strategy: SegmentReader.WaitStrategy = spinMicroseconds == 0 ? .futex : .spinThenFutex(nanoseconds: spinMicroseconds * 1000)
            announceReady()
            cpuAtReady = ownCPUNanoseconds()
            while last < until {
                if handle.waitForVersion(after: last, timeoutNanoseconds: 10_000_000_000, strategy: strategy) == last { break }
                guard let (version, length) = try handle.reader.withLatestVersion(verifyingChecksum: true, { borrowed in
                    (borrowed.version, borrowed.bytes.count)
                }) else { continue }
                last = version
                bytes += length
                versions += 1
            }
        } else {
            try await followSegment(socket: socket, segment: segment, afterReady: { cpuAtReady = ownCPUNanoseconds() }) { info, _ in
                bytes += info.length
                versions += 1
                return info.version < until
            }
        }
        AgentReport(bytes: bytes, versions: versions, finishedAt: Clock.monotonicNanoseconds(),
                    cpuNanoseconds: ownCPUNanoseconds() - cpuAtReady).emit()
    }
}

/// Reads `total` bytes from a Unix stream socket.
struct SocketDrain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "socket-drain")
    @Option var path: String
    @Option var total: Int

    func run() throws {
        let fd = try RawStream.connect(path)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var received = 0
        announceReady()
        let cpuAtReady = ownCPUNanoseconds()
        while received < total {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, min($0.count, total - received)) }
            if n <= 0 { break }
            received += n
        }
        AgentReport(bytes: received, finishedAt: Clock.monotonicNanoseconds(), cpuNanoseconds: ownCPUNanoseconds() - cpuAtReady).emit()
    }
}

/// Plain blocking Unix stream sockets: the baseline transport.
enum RawStream {
    static func address(_ path: String) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        return address
    }

    static func listen(_ path: String) throws -> Int32 {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = address(path)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(fd, 128) == 0 else { throw Errno(rawValue: errno) }
        return fd
    }

    static func connect(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = address(path)
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw Errno(rawValue: errno) }
        return fd
    }

    static func readExactly(_ fd: Int32, _ buffer: inout [UInt8]) -> Bool {
        var done = 0
        let count = buffer.count
        return buffer.withUnsafeMutableBytes { raw in
            while done < count {
                let n = read(fd, raw.baseAddress! + done, count - done)
                if n <= 0 { return false }
                done += n
            }
            return true
        }
    }

    static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) {
        var done = 0
        while done < buffer.count {
            let n = write(fd, buffer.baseAddress! + done, buffer.count - done)
            if n <= 0 { return }
            done += n
        }
    }
}

/// One process of the fan-out floor: waits on the first word of a shared memfd with
/// `FUTEX_WAIT` and, each time it runs again, notes the monotonic time for the round it sees.
struct FutexWaiter: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "futex-waiter")
    @Option(help: "The shared memory file (a /proc/PID/fd path).") var memoryFile: String
    @Option var index: Int
    @Option var rounds: UInt64

    func run() throws {
        let file = try FileDescriptor.open(memoryFile, .readWrite)
        let size = 64 + (index + 1) * Int(rounds) * 8
        let region = try MappedRegion(mapping: file, length: try file.fileSize(), writable: true)
        precondition(region.length >= size)
        let word = UnsafePointer(region.base.assumingMemoryBound(to: UInt32.self))
        let stamps = (region.base + 64).assumingMemoryBound(to: UInt64.self) + index * Int(rounds)
        let atomicWord = UnsafeAtomic<UInt32>(at: region.base.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
        var seen: UInt32 = 0
        announceReady()
        while UInt64(seen) < rounds {
            let current = atomicWord.load(ordering: .acquiring)
            if current == seen {
                if case .timedOut = Futex.wait(on: word, whileEqualTo: seen, timeoutNanoseconds: 10_000_000_000) { break }
                continue
            }
            stamps[Int(current) - 1] = Clock.monotonicNanoseconds()
            seen = current
        }
        AgentReport().emit()
    }
}

