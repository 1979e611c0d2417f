import ArgumentParser
import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

// The processes the integration tests spawn: a writer of self-checking payloads, readers that
// verify every read, and an attacker that tries to write segment memory it was given read-only.
// Each prints one JSON object on stdout as its result.

/// A payload that proves its own integrity: `[u64 seed][u64 length][bytes from seed]`.
enum SelfCheckingPayload {
    static func make(seed: UInt64, length: Int) -> [UInt8] {
        precondition(length >= 16)
        var bytes = [UInt8](repeating: 0, count: length)
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: seed.littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: UInt64(length).littleEndian, toByteOffset: 8, as: UInt64.self)
            var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
            var offset = 16
            while offset + 8 <= length {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17
                raw.storeBytes(of: state, toByteOffset: offset, as: UInt64.self)
                offset += 8
            }
            while offset < length { raw[offset] = UInt8(truncatingIfNeeded: seed); offset += 1 }
        }
        return bytes
    }

    /// The seed if `bytes` is exactly what `make` produces for it, else nil.
    static func verify(_ bytes: [UInt8]) -> UInt64? {
        guard bytes.count >= 16 else { return nil }
        let seed = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        return make(seed: seed, length: bytes.count) == bytes ? seed : nil
    }
}

func emit(_ object: [String: Any]) {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    FileHandle.standardOutput.write(data + Data([0x0A]))
}

@main
struct TestKit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbroker-testkit",
        subcommands: [Writer.self, Reader.self, Attack.self, WaitVersion.self, Producer.self, Follower.self, RingProducer.self])
}

struct Writer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Publish self-checking payloads as fast as possible.")
    @Option var socket: String
    @Option var segment: String
    @Option var count: Int
    @Option var size: Int

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-writer")
        let start = Clock.monotonicNanoseconds()
        var last: UInt64 = 0
        for index in 0..<count {
            last = try await client.publish(segment, bytes: SelfCheckingPayload.make(seed: UInt64(index + 1), length: size)).version
        }
        let seconds = Double(Clock.monotonicNanoseconds() - start) / 1e9
        emit(["published": count, "lastVersion": last, "seconds": seconds, "perSecond": Double(count) / seconds])
    }
}

struct Reader: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read continuously, verifying every read, until a version appears.")
    @Option var socket: String
    @Option var segment: String
    @Option(help: "Stop after reading this version or a later one.") var untilVersion: UInt64
    @Option(help: "Give up after this many seconds.") var timeout: Double = 120
    @Flag(help: "Also subscribe (and never read the events): a stalled subscriber.") var subscribeAndStall = false

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-reader")
        let handle = try await client.open(segment)
        var stalled: Subscription?
        if subscribeAndStall { stalled = try await client.subscribe(segment) }
        FileHandle.standardError.write(Data("reading\n".utf8))
        let deadline = Clock.monotonicNanoseconds() + UInt64(timeout * 1e9)
        var reads = 0, mismatches = 0, regressions = 0, crcFailures = 0, contended = 0, neverPublished = 0
        var distinct = 0
        var lastVersion: UInt64 = 0
        while lastVersion < untilVersion && Clock.monotonicNanoseconds() < deadline {
            do {
                guard let snapshot = try handle.read() else { neverPublished += 1; continue }
                reads += 1
                if snapshot.version < lastVersion { regressions += 1 }
                if snapshot.version != lastVersion { distinct += 1 }
                lastVersion = snapshot.version
                // The writer publishes seed k as version k (on a fresh segment).
                if SelfCheckingPayload.verify(snapshot.bytes) != snapshot.version { mismatches += 1 }
            } catch {
                guard case .segment(let failure) = error else { throw error }
                switch failure {
                case .checksumMismatch: crcFailures += 1
                case .contended: contended += 1
                default: throw error
                }
            }
        }
        _ = stalled
        emit(["reads": reads, "distinctVersions": distinct, "lastVersion": lastVersion, "mismatches": mismatches,
              "regressions": regressions, "crcFailures": crcFailures, "contended": contended, "neverPublished": neverPublished])
    }
}

struct WaitVersion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Wait on the futex word for a version newer than the current one.")
    @Option var socket: String
    @Option var segment: String
    @Option var timeout: Double = 60

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-waiter")
        let handle = try await client.open(segment)
        let before = handle.latestVersion
        FileHandle.standardError.write(Data("waiting after \(before)\n".utf8))
        let after = handle.waitForVersion(after: before, timeoutNanoseconds: UInt64(timeout * 1e9))
        let snapshot = try handle.read()
        emit(["before": before, "after": after, "content": String(decoding: snapshot?.bytes ?? [], as: UTF8.self)])
    }
}

struct Attack: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Try every way to write a segment received read-only.")
    @Option var socket: String
    @Option var segment: String

    /// "errno N" for a failure (the test compares N with the expected constant), else "succeeded".
    func outcome(_ result: Int32) -> String {
        result == -1 ? "errno \(errno)" : "succeeded"
    }

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-attacker")
        // Receive the raw descriptor the way any reader does: OPEN and take the SCM_RIGHTS fd.
        let fd = try SeqpacketSocket.connect(path: socket)
        func roundTrip(_ request: Request) throws -> (ServerMessage, [FileDescriptor]) {
            _ = try request.encode(requestID: 1).withUnsafeBytes { try SeqpacketSocket.send(fd, $0) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 70_000, alignment: 8)
            defer { buffer.deallocate() }
            let message = try SeqpacketSocket.receive(fd, into: buffer)!
            let frame = UnsafeRawBufferPointer(rebasing: buffer[..<message.byteCount])
            let header = try FrameHeader.parse(frame)
            return (try ServerMessage.decode(type: header.type, body: Frame.body(of: frame)), message.descriptors)
        }
        _ = try roundTrip(.hello(protocolVersion: ControlProtocol.version, clientName: "attacker"))
        let (reply, descriptors) = try roundTrip(.open(segment: segment))
        guard case .opened(let info) = reply, let memory = descriptors.first else {
            emit(["error": "open failed: \(reply)"])
            throw ExitCode(1)
        }
        let raw = memory.rawValue
        let size = Int(info.mappingSize)
        var results: [String: String] = [:]
        let writable = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0)
        results["mmapWritable"] = writable == MAP_FAILED ? "errno \(errno)" : "succeeded"
        var byte: UInt8 = 0x41
        results["write"] = outcome(Int32(pwrite(raw, &byte, 1, 300)))
        results["ftruncate"] = outcome(ftruncate(raw, 0))
        results["ftruncateGrow"] = outcome(ftruncate(raw, off_t(size * 2)))
        results["reopenReadWrite"] = outcome(open("/proc/self/fd/\(raw)", O_RDWR))
        results["fchmod"] = outcome(fchmod(raw, 0o666))
        results["reopenAfterFchmod"] = outcome(open("/proc/self/fd/\(raw)", O_RDWR))
        let readOnly = mmap(nil, size, PROT_READ, MAP_SHARED, raw, 0)!
        results["mprotectWritable"] = outcome(mprotect(readOnly, size, PROT_READ | PROT_WRITE))
        results["uid"] = "\(getuid())"
        _ = client
        emit(results)
    }
}

/// Keeps publishing through daemon restarts until told to stop (SIGTERM or --seconds), checking
/// that the version counter only ever moves up: a restart that lost the segment would reset it.
struct Producer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Publish continuously across daemon restarts.")
    @Option var socket: String
    @Option var segment: String
    @Option var size: Int = 256
    @Option var seconds: Double = 60
    @Option(help: "Pause between publishes, in milliseconds.") var intervalMs: Double = 2
    @Option(help: "Stop once this file exists.") var stopFile: String?

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-producer")
        FileHandle.standardError.write(Data("producing\n".utf8))
        let deadline = Clock.monotonicNanoseconds() + UInt64(seconds * 1e9)
        var published = 0, failures = 0, resets = 0
        var highest: UInt64 = 0
        var seed: UInt64 = 1
        while Clock.monotonicNanoseconds() < deadline && !stopRequested(stopFile) {
            do {
                let receipt = try await client.publish(segment, bytes: SelfCheckingPayload.make(seed: seed, length: size))
                if receipt.version <= highest { resets += 1 }
                highest = max(highest, receipt.version)
                published += 1
            } catch {
                failures += 1  // in flight when the daemon died; the client reconnects by itself
            }
            seed += 1
            try? await Task.sleep(nanoseconds: UInt64(intervalMs * 1e6))
        }
        emit(["published": published, "failures": failures, "resets": resets, "highestVersion": highest])
    }
}

/// Maps a segment once and reads it until told to stop, through daemon restarts: the mapping must
/// keep showing new, intact versions. Also follows a subscription, which must survive restarts.
struct Follower: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read one mapping and one subscription across daemon restarts.")
    @Option var socket: String
    @Option var segment: String
    @Option var seconds: Double = 60
    @Option(help: """
        Stop once this file exists. If it holds a version number, first wait (up to 10 s) until \
        both the mapping and the subscription have reached it: events travel over the socket and \
        may trail the mapping.
        """) var stopFile: String?

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-follower")
        let handle = try await client.open(segment)
        let subscription = try await client.subscribe(segment)
        let events = EventCounter()
        let listener = Task {
            for await event in subscription {
                if case .version(let info) = event { events.record(info.version) }
            }
        }
        FileHandle.standardError.write(Data("following\n".utf8))
        var deadline = Clock.monotonicNanoseconds() + UInt64(seconds * 1e9)
        var reads = 0, corrupt = 0, regressions = 0, distinct = 0
        var last: UInt64 = 0
        let first = handle.latestVersion
        var target: UInt64?
        while Clock.monotonicNanoseconds() < deadline {
            if let wanted = target {
                if last >= wanted && events.last >= wanted { break }
            } else if stopRequested(stopFile) {
                let content = stopFile.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) } ?? ""
                guard let wanted = UInt64(content.trimmingCharacters(in: .whitespacesAndNewlines)) else { break }
                target = wanted
                deadline = min(deadline, Clock.monotonicNanoseconds() + 10_000_000_000)
                continue
            }
            _ = handle.waitForVersion(after: last, timeoutNanoseconds: 50_000_000)
            do {
                guard let snapshot = try handle.read() else { continue }
                reads += 1
                if SelfCheckingPayload.verify(snapshot.bytes) == nil { corrupt += 1 }
                if snapshot.version < last { regressions += 1 }
                if snapshot.version != last { distinct += 1 }
                last = snapshot.version
            } catch {
                corrupt += 1
            }
        }
        listener.cancel()
        emit(["reads": reads, "corrupt": corrupt, "regressions": regressions, "distinctVersions": distinct,
              "firstVersion": first, "lastVersion": last, "events": events.count, "lastEventVersion": events.last])
    }
}

/// Counts subscription events from the listening task.
final class EventCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var _count = 0
    private var _last: UInt64 = 0
    func record(_ version: UInt64) { lock.withLock { _count += 1; _last = version } }
    var count: Int { lock.withLock { _count } }
    var last: UInt64 { lock.withLock { _last } }
}

/// SIGTERM, or the stop file appearing, asks long-running commands to finish and print their
/// result. (A file works across `nsenter`, which does not forward signals.)
nonisolated(unsafe) var terminationFlag: sig_atomic_t = 0
func stopRequested(_ stopFile: String?) -> Bool {
    if let stopFile, FileManager.default.fileExists(atPath: stopFile) { return true }
    enum Once { nonisolated(unsafe) static var installed = false }
    if !Once.installed {
        Once.installed = true
        signal(SIGTERM) { _ in terminationFlag = 1 }
    }
    return terminationFlag != 0
}

/// Publishes self-checking payloads (seed k as the k-th) through a publish ring, with lengths
/// that vary so the ring wraps at every possible offset.
struct RingProducer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ring-producer",
                                                    abstract: "Publish through a publish ring, then flush (or just exit).")
    @Option var socket: String
    @Option var segment: String
    @Option var count: Int
    @Option(help: "Longest payload; lengths vary from 16 up to it.") var maxLength: Int = 64
    @Flag(help: "Exit without flushing or closing: the daemon must still publish what was appended.") var noFlush = false

    func run() async throws {
        let client = try await ShmBrokerClient.connect(socketPath: socket, clientName: "testkit-ring-producer")
        let publisher = try await client.openPublisher(segment)
        FileHandle.standardError.write(Data("publishing\n".utf8))
        var generator = SystemRandomNumberGenerator()
        for seed in 1...UInt64(count) {
            let length = seed % 5 == 0 ? maxLength : Int.random(in: 16...max(16, maxLength), using: &generator)
            try publisher.publish(SelfCheckingPayload.make(seed: seed, length: length))
        }
        if noFlush {
            emit(["appended": count])
            Glibc.exit(0)
        }
        let results = try publisher.flush()
        await publisher.close()
        emit(["appended": count, "lastVersion": results.lastVersion, "consumed": results.consumedEntries,
              "refused": results.refusedEntries])
    }
}
