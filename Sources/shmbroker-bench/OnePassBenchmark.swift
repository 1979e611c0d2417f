import ArgumentParser
import Atomics
import Foundation
import Glibc
import ShmBroker
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage

/// Large versions with integrity: the owner fills a version in place block by block and a reader
/// consumes it block by block, against the same handoff with no checksum at all (issue 20, items
/// 1, 2 and 5). Every path does the same work besides integrity: the producer writes each 64 KiB
/// block (a memset standing for a decoder or a camera), the reader folds every byte of it (an
/// XOR over 64-bit words standing for a consumer that reads the data once).
extension Run {
    /// The paths, in the order they take turns.
    static let onePassPaths = ["floor", "one-pass", "two-pass"]

    func onePassBenchmark(_ owner: BenchOwner, _ report: inout Report) throws -> [String: OnePassRow] {
        let trials = self.trials ?? (quick ? 1 : 5)
        report.section("Large versions, integrity in one pass (MB/s delivered to 1 spinning reader; median of \(trials) interleaved trials)")
        report.text += """
            floor: the slot protocol with no checksum (the owner fills each block in place, the reader folds it in place);
            one-pass: publish(length:fillingBlocks:) checksums each block after filling it, readBlocks verifies each block before folding it;
            two-pass: a loan filled whole then checksummed whole, a reader that verifies the whole version and then folds it.

            """
        report.row(["payload", "floor", "one-pass", "two-pass", "one/floor", "two/floor"])
        var rows: [String: OnePassRow] = [:]
        for size in [1 << 20, 16 << 20] {
            let totalBytes = quick ? 64 << 20 : (size >= 16 << 20 ? 1 << 30 : 512 << 20)
            let count = max(16, totalBytes / size)
            let floor = try FloorSegment(capacity: size)
            defer { floor.close() }
            var results: [String: [ThroughputTrial]] = [:], produced: [String: [Double]] = [:]
            for _ in 0..<trials {
                for path in Self.onePassPaths {
                    let (trial, rate) = try onePassTrial(path, owner: owner, floor: floor, size: size, count: count)
                    results[path, default: []].append(trial)
                    produced[path, default: []].append(rate)
                }
            }
            func median(_ path: String) -> ThroughputTrial? {
                results[path].map { $0.sorted { $0.megabytesPerSecond < $1.megabytesPerSecond }[$0.count / 2] }
            }
            let floorRate = median("floor")?.megabytesPerSecond ?? .nan
            let onePass = median("one-pass")?.megabytesPerSecond ?? .nan
            let twoPass = median("two-pass")?.megabytesPerSecond ?? .nan
            let perTrial = zip(results["one-pass"] ?? [], results["floor"] ?? []).map { $0.megabytesPerSecond / $1.megabytesPerSecond }.sorted()
            rows[sizeName(size)] = OnePassRow(
                floor: Measured(floorRate), onePass: Measured(onePass), twoPass: Measured(twoPass),
                ratioOnePass: Measured(onePass / floorRate), ratioTwoPass: Measured(twoPass / floorRate),
                ratioOnePassPerTrial: perTrial.map(Measured.init),
                cpuCores: ["floor": median("floor")?.cpu, "one_pass": median("one-pass")?.cpu, "two_pass": median("two-pass")?.cpu].compactMapValues { $0 })
            report.row([sizeName(size), fmt(floorRate, 0), fmt(onePass, 0), fmt(twoPass, 0), ratioCell(onePass / floorRate), ratioCell(twoPass / floorRate)])
            if perTrial.count > 1 { report.note("one-pass/floor per interleaved trial: " + perTrial.map { fmt($0) }.joined(separator: ", ")) }
            report.note("producer alone, MB/s written (median): " + Self.onePassPaths.map { path in
                "\(path) \(fmt((produced[path] ?? []).sorted()[(produced[path] ?? [0]).count / 2], 0))" }.joined(separator: "; "))
            report.note("CPU, cores (- / owner / reader): " + Self.onePassPaths.compactMap { path in median(path).map { "\(path) \($0.cpu.cell)" } }
                .joined(separator: "; "))
            let target = size == 16 << 20 ? 0.9 : 0.8
            report.goal("owner -> 1 reader with integrity (one pass) >= \(fmt(target, 1))x the no-integrity floor at \(sizeName(size))",
                        value: onePass / floorRate, target: target)
        }
        return rows
    }

    /// One trial of one path: `count` versions of `size` bytes, one reader reading all it can.
    /// - Returns: the trial, and the producer's own rate (MB/s written while it published).
    func onePassTrial(_ path: String, owner: BenchOwner, floor: FloorSegment, size: Int, count: Int) throws -> (ThroughputTrial, Double) {
        let owned = owner["tp-\(sizeName(size))"]
        let start = path == "floor" ? floor.latestVersion : owned.latestVersion
        var arguments = ["block-drain", "--mode", path, "--until", "\(start + UInt64(count))"]
        arguments += path == "floor" ? ["--memory-file", floor.paths.memory, "--board", floor.paths.board]
                                     : ["--socket", owner.socketPath, "--segment", "tp-\(sizeName(size))"]
        // The reader owns CPU 1, the producer CPU 0: unpinned, the scheduler now and then runs both
        // spinning parties on one vCPU, and the run measures time slices instead of memory.
        let agent = try AgentProcess(arguments + ["--pin-cpu", "1"])
        try agent.waitUntilReady()
        let producerCPU = ownCPUNanoseconds()
        let began = Clock.monotonicNanoseconds()
        let failure = onPinnedThread(cpu: 0) { () throws in
            var pattern: UInt8 = 0
            for _ in 0..<count {
                pattern &+= 1
                switch path {
                case "floor":
                    floor.publish(length: size) { block, _ in memset(block.baseAddress!, Int32(pattern), block.count) }
                case "one-pass":
                    try owned.publish(length: size, fillingBlocks: { block, _ in memset(block.baseAddress!, Int32(pattern), block.count) })
                default:
                    let loan = try owned.loan(length: size)
                    for offset in stride(from: 0, to: size, by: SegmentLayout.defaultChecksumBlockSize) {
                        memset(loan.buffer.baseAddress! + offset, Int32(pattern), min(SegmentLayout.defaultChecksumBlockSize, size - offset))
                    }
                    loan.publish()
                }
            }
        }
        if let failure { throw failure }
        let produced = Double(size * count) / Double(max(Clock.monotonicNanoseconds() - began, 1)) * 1000
        let producer = ownCPUNanoseconds() - producerCPU
        return (throughputTrial([try agent.result()], began: began, producerCPU: producer, daemonCPU: 0), produced)
    }
}

/// Runs `body` on a new thread pinned to `cpu` and waits for it; returns what it threw.
func onPinnedThread(cpu: Int, _ body: @escaping () throws -> Void) -> (any Error)? {
    final class Outcome: @unchecked Sendable { var error: (any Error)? }
    let outcome = Outcome()
    let done = DispatchSemaphore(value: 0)
    let work = UncheckedBox(body)
    let thread = Thread {
        try? CPUAffinity.pinCurrentThread(toCPU: cpu)
        do { try work.value() } catch { outcome.error = error }
        done.signal()
    }
    thread.start()
    done.wait()
    return outcome.error
}

/// Carries a value the caller knows is used by one thread at a time into a `@Sendable` closure.
struct UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// The floor of the large-version benchmark: a segment published by the slot protocol of
/// LAYOUT.md with no checksum at all (the version's `crc64` stays 0), and the same wake-up (the
/// futex word and the wait board) as the owner's. Not a product path: what integrity is measured
/// against.
final class FloorSegment {
    let file: FileDescriptor
    let boardFile: FileDescriptor
    private let region: MappedRegion
    private let boardRegion: MappedRegion
    private let layout: SegmentLayout
    private(set) var latestVersion: UInt64 = 0

    init(capacity: Int) throws {
        layout = SegmentLayout(capacity: capacity, slotCount: 3)
        file = try MemoryFile.create(name: "bench-floor", size: layout.totalSize, mode: 0o600)
        boardFile = try MemoryFile.create(name: "bench-floor-board", size: SegmentLayout.WaitBoard.size, mode: 0o600)
        region = try MappedRegion(mapping: file, length: layout.totalSize, writable: true, populate: true)
        boardRegion = try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true)
        // Formatted by the real writer, so that a SegmentReader accepts it; published below by hand.
        _ = SegmentWriter(formatting: region, layout: layout, name: "floor", board: boardRegion)
    }

    /// Where an agent (a child of this process) opens the two files.
    var paths: (memory: String, board: String) {
        ("/proc/\(getpid())/fd/\(file.rawValue)", "/proc/\(getpid())/fd/\(boardFile.rawValue)")
    }

    private func atomic64(_ offset: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (region.base + offset).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
    }

    private func atomic32(_ base: UnsafeMutableRawPointer, _ offset: Int) -> UnsafeAtomic<UInt32> {
        UnsafeAtomic(at: (base + offset).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }

    /// Publishes the next version, `fill` writing it block by block in place; no checksum.
    func publish(length: Int, fill: (UnsafeMutableRawBufferPointer, Int) -> Void) {
        let version = latestVersion + 1
        let slot = layout.slotOffset(forVersion: version)
        atomic64(slot + SegmentLayout.Slot.sequence).store(0, ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        let data = region.base + slot + SegmentLayout.Slot.data
        for offset in stride(from: 0, to: length, by: SegmentLayout.defaultChecksumBlockSize) {
            fill(UnsafeMutableRawBufferPointer(start: data + offset, count: min(SegmentLayout.defaultChecksumBlockSize, length - offset)), offset)
        }
        (region.base + slot + SegmentLayout.Slot.length).storeBytes(of: UInt64(length).littleEndian, as: UInt64.self)
        (region.base + slot + SegmentLayout.Slot.crc64).storeBytes(of: 0, as: UInt64.self)
        atomic64(slot + SegmentLayout.Slot.sequence).store(version, ordering: .releasing)
        atomic64(SegmentLayout.Header.latestVersion).store(version, ordering: .releasing)
        latestVersion = version
        atomic32(region.base, SegmentLayout.Header.futexWord).wrappingIncrement(ordering: .sequentiallyConsistent)
        if atomic32(boardRegion.base, SegmentLayout.WaitBoard.sleepers).load(ordering: .sequentiallyConsistent) != 0 {
            _ = Futex.wakeAll(UnsafePointer((region.base + SegmentLayout.Header.futexWord).assumingMemoryBound(to: UInt32.self)))
        }
    }

    func close() {
        file.closeQuietly()
        boardFile.closeQuietly()
    }
}

/// Folds every byte of `bytes` into a 64-bit word (XOR of its 8-byte words, four lanes): a
/// consumer that reads the data once, at memory speed.
@inline(never)
func fold(_ bytes: UnsafeRawBufferPointer, into accumulator: inout UInt64) {
    guard let base = bytes.baseAddress else { return }
    var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0
    var index = 0
    while index + 32 <= bytes.count {
        a ^= base.loadUnaligned(fromByteOffset: index, as: UInt64.self)
        b ^= base.loadUnaligned(fromByteOffset: index + 8, as: UInt64.self)
        c ^= base.loadUnaligned(fromByteOffset: index + 16, as: UInt64.self)
        d ^= base.loadUnaligned(fromByteOffset: index + 24, as: UInt64.self)
        index += 32
    }
    while index < bytes.count {
        a ^= UInt64(base.load(fromByteOffset: index, as: UInt8.self))
        index += 1
    }
    accumulator ^= a ^ b ^ c ^ d
}

/// Reads every version it can until `until` as one of the large-version benchmark's paths.
struct BlockDrain: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "block-drain")
    @Option(help: "floor, one-pass or two-pass.") var mode: String
    @Option var until: UInt64
    @Option(help: "The floor segment's memory file (a /proc/PID/fd path).") var memoryFile: String?
    @Option(help: "The floor segment's wait board (a /proc/PID/fd path).") var board: String?
    @Option var socket: String?
    @Option var segment: String?
    @Option(help: "Pin the reading thread to this CPU.") var pinCPU: Int?

    func run() throws {
        if let pinCPU { try CPUAffinity.pinCurrentThread(toCPU: pinCPU) }
        let reader: SegmentReader
        if mode == "floor" {
            let memory = try FileDescriptor.open(memoryFile!, .readOnly)
            let boardFile = try FileDescriptor.open(board!, .readWrite)
            reader = try SegmentReader(region: try MappedRegion(mapping: memory, length: try memory.fileSize(), writable: false),
                                       board: try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true))
            try? memory.close()
            try? boardFile.close()
        } else {
            reader = try openedReader(socket: socket!, segment: segment!)
        }
        var last = reader.latestVersion, bytes = 0, versions = 0, accumulator: UInt64 = 0
        announceReady()
        let cpuAtReady = ownCPUNanoseconds()
        while last < until {
            // Spinning: the reader reads whenever a version is there, so what it delivers is the
            // slower of the producer's and its own rate, not a wake-up's latency.
            if reader.waitForVersion(after: last, timeoutNanoseconds: 10_000_000_000, strategy: .spin) == last { break }
            let read: (UInt64, Int)?
            switch mode {
            case "floor":
                read = try reader.withLatestVersion(verifyingChecksum: false) { borrowed in
                    var folded: UInt64 = 0
                    for offset in stride(from: 0, to: borrowed.bytes.count, by: SegmentLayout.defaultChecksumBlockSize) {
                        fold(UnsafeRawBufferPointer(rebasing: borrowed.bytes[offset..<min(borrowed.bytes.count, offset + SegmentLayout.defaultChecksumBlockSize)]),
                             into: &folded)
                    }
                    accumulator ^= folded
                    return (borrowed.version, borrowed.bytes.count)
                }
            case "one-pass":
                var folded: UInt64 = 0
                let version = try reader.readBlocks { block in
                    if block.offset == 0 { folded = 0 }
                    fold(block.bytes, into: &folded)
                }
                accumulator ^= folded
                read = version.map { ($0.version, $0.length) }
            default:
                read = try reader.withLatestVersion(verifyingChecksum: true) { borrowed in
                    var folded: UInt64 = 0
                    fold(borrowed.bytes, into: &folded)
                    accumulator ^= folded
                    return (borrowed.version, borrowed.bytes.count)
                }
            }
            guard let (version, length) = read else { continue }
            last = version
            bytes += length
            versions += 1
        }
        if accumulator == 0x5EED { FileHandle.standardError.write(Data("(fold)\n".utf8)) }  // keeps the folds
        AgentReport(bytes: bytes, versions: versions, finishedAt: Clock.monotonicNanoseconds(),
                    cpuNanoseconds: ownCPUNanoseconds() - cpuAtReady).emit()
    }

    /// Opens `segment` through the owner's socket and returns its reader (the connection is
    /// closed once the mapping is made: reads never involve the owner again).
    func openedReader(socket: String, segment: String) throws -> SegmentReader {
        let box = ReaderBox()
        let done = DispatchSemaphore(value: 0)
        Task {
            do {
                let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "bench-blocks")
                box.result = .success(try await client.open(segment).reader)
            } catch {
                box.result = .failure(error)
            }
            done.signal()
        }
        done.wait()
        return try box.result!.get()
    }
}

private final class ReaderBox: @unchecked Sendable {
    var result: Result<SegmentReader, any Error>?
}
