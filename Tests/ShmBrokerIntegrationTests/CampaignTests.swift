import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// The hostile-input and fault campaign, bounded so that it fits the suite: socket-level fuzzing
/// while a well-behaved client publishes and verifies, 200 SIGKILLs of a publishing standalone
/// daemon, and connection abuse. (The kill loop under systemd is in SystemdServiceTests; the
/// coverage-guided fuzzers are Tests/ShmBrokerFuzz/fuzz.sh.) Figures: docs/RELIABILITY.md.
final class CampaignTests: XCTestCase {
    /// Mutations of valid frames (bit flips, truncation, wrong lengths, types and flags, and
    /// descriptors where none belong) from several connections at once, while another client
    /// publishes and verifies every version: it must see no error, and the daemon must carry on.
    func testSocketFuzzingDoesNotDisturbAWellBehavedClient() async throws {
        let daemon = try TestDaemon(segments: [segment("good", size: 4096, publishers: ["*"]),
                                               segment("target", size: 4096, publishers: ["*"])])
        defer { daemon.stop() }
        let good = try await daemon.connect()
        let handle = try await good.open("good")
        let socketPath = daemon.socketPath
        let fuzzers = (0..<6).map { index in
            Thread {
                var generator = SplitMix64(seed: 0xF022 &+ UInt64(index))
                CampaignTests.fuzz(socketPath: socketPath, frames: 8000, generator: &generator)
            }
        }
        fuzzers.forEach { $0.start() }
        var published = 0, mismatches = 0
        let began = Date()
        while fuzzers.contains(where: { !$0.isFinished }) && Date().timeIntervalSince(began) < 120 {
            let payload = Array("version \(published)".utf8)
            let receipt = try await good.publish("good", bytes: payload)
            let snapshot = try handle.read()
            if snapshot?.bytes != payload || snapshot?.version != receipt.version { mismatches += 1 }
            published += 1
        }
        XCTAssertTrue(fuzzers.allSatisfy(\.isFinished), "the fuzzers finished")
        XCTAssertGreaterThan(published, 10)
        XCTAssertEqual(mismatches, 0)
        XCTAssertTrue(daemon.child.process.isRunning, daemon.child.stderrText.suffix(2000).description)
        let status = try await good.status()
        XCTAssertGreaterThan(status.counters.malformedRequests, 100, "the fuzz frames were seen and refused")
        XCTAssertEqual(status.segments.first { $0.name == "good" }?.version, UInt64(published))
        good.close()
    }

    static func fuzz(socketPath: String, frames: Int, generator: inout SplitMix64) {
        let valid: [[UInt8]] = [
            Request.hello(protocolVersion: ControlProtocol.version, clientName: "fuzz").encode(requestID: 1),
            Request.open(segment: "target").encode(requestID: 2),
            Request.subscribe(segment: "target").encode(requestID: 3),
            Request.unsubscribe(segment: "target").encode(requestID: 4),
            Request.publish(segment: "target", payload: .inline(Array("payload".utf8))).encode(requestID: 5),
            Request.publish(segment: "target", payload: .attachedFile(length: 4)).encode(requestID: 6),
            Request.status.encode(requestID: 7),
            Request.attachRing(segment: "target").encode(requestID: 8),
            Request.detachRing(segment: "target").encode(requestID: 9),
        ]
        let memfd = try? MemoryFile.create(name: "fuzz", size: 4096)
        defer { memfd?.closeQuietly() }
        var connection: FileDescriptor?
        for _ in 0..<frames {
            if connection == nil { connection = try? SeqpacketSocket.connect(path: socketPath) }
            guard let socket = connection else { return }
            var frame = valid[Int(generator.next() % UInt64(valid.count))]
            switch generator.next() % 6 {
            case 0: for _ in 0..<(1 + generator.next() % 4) { frame[Int(generator.next() % UInt64(frame.count))] ^= UInt8(1 << (generator.next() % 8)) }
            case 1: frame = Array(frame.prefix(1 + Int(generator.next() % UInt64(frame.count))))
            case 2: if frame.count >= 12 { frame[8] = UInt8(truncatingIfNeeded: generator.next()); frame[9] = UInt8(truncatingIfNeeded: generator.next()) }
            case 3: if frame.count >= 4 { frame[0] = UInt8(truncatingIfNeeded: generator.next()); frame[2] = UInt8(truncatingIfNeeded: generator.next() % 3) }
            case 4: frame += (0..<(generator.next() % 64)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            default: break
            }
            let descriptors = generator.next() % 5 == 0 ? memfd.map { Array(repeating: $0, count: Int(1 + generator.next() % 3)) } ?? [] : []
            let sent = frame.withUnsafeBytes { try? SeqpacketSocket.send(socket, $0, descriptors: descriptors) }
            if sent == nil { socket.closeQuietly(); connection = nil; continue }
            // Read whatever came back (replies, events, descriptors), without waiting long.
            var poller = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 70_000, alignment: 8)
            defer { buffer.deallocate() }
            var wait: Int32 = 50  // for the reply, then only for what is already there
            while poll(&poller, 1, wait) == 1 {
                wait = 0
                guard let message = try? SeqpacketSocket.receive(socket, into: buffer, maximumDescriptors: 4),
                      message.byteCount > 0 else { socket.closeQuietly(); connection = nil; break }
                message.descriptors.forEach { $0.closeQuietly() }
            }
            if generator.next() % 50 == 0 { connection?.closeQuietly(); connection = nil }
        }
        connection?.closeQuietly()
    }

    /// 200 rounds: a client maps a segment and publishes self-checking versions while the daemon
    /// is SIGKILLed at a random moment. Through the mapping (which outlives the daemon), the
    /// latest version must read intact and be at least the last one the client got a receipt for.
    func testTwoHundredSIGKILLsWhilePublishingTearNothingAndLoseNoCommittedVersion() async throws {
        let daemon = try TestDaemon(segments: [segment("data", size: 4096, publishers: ["*"])])
        defer { daemon.stop() }
        var generator = SplitMix64(seed: 0x4B11)
        var torn = 0, lost = 0, receipts = 0
        for round in 0..<200 {
            let client = try await ShmBrokerClient.connect(socketPath: daemon.socketPath, clientName: "kill-loop",
                                                           options: .init(reconnects: false))
            let handle = try await client.open("data")
            let pid = daemon.pid
            let delay = UInt32(generator.next() % 3000)
            let killer = Thread { usleep(delay); kill(pid, SIGKILL) }
            killer.start()
            var last: PublishReceipt?
            for index in 0..<1000 {
                let payload = SelfCheckingPayloadForTests.make(seed: UInt64(round * 1000 + index), length: 64 + index % 512)
                guard let receipt = try? await client.publish("data", bytes: payload) else { break }
                last = receipt
                receipts += 1
            }
            while !killer.isFinished { usleep(1000) }
            do {
                let snapshot = try handle.read()
                if let last {
                    if (snapshot?.version ?? 0) < last.version { lost += 1 }
                    if snapshot?.version == last.version && snapshot?.crc64 != last.crc64 { torn += 1 }
                }
                if let bytes = snapshot?.bytes, SelfCheckingPayloadForTests.verify(bytes) == nil { torn += 1 }
            } catch {
                torn += 1
            }
            client.close()
            try daemon.restart(with: SIGKILL)
        }
        XCTAssertEqual(torn, 0, "torn or corrupt reads")
        XCTAssertEqual(lost, 0, "committed versions not visible after the kill")
        XCTAssertGreaterThan(receipts, 200, "publishes were in flight around the kills")
    }

    /// 1000 connections at once, 2000 connect/close cycles, refusals beyond the limit: the daemon
    /// serves them and gives its descriptors and memory back.
    func testConnectionAbuseLeavesNoDescriptorOrMemoryBehind() async throws {
        let daemon = try TestDaemon(segments: [segment("s", size: 64)], limits: ["maxClients": 1000])
        defer { daemon.stop() }
        let probe = try await daemon.connect()
        _ = try await probe.status()
        let baselineFDs = try descriptorCount(of: daemon.pid)
        let baselineRSS = try residentKiB(of: daemon.pid)
        var held: [FileDescriptor] = []
        for _ in 0..<999 { held.append(try SeqpacketSocket.connect(path: daemon.socketPath)) }
        // Over the limit: refused with a reason, right after connect.
        var refused = 0
        for _ in 0..<50 {
            let extra = try SeqpacketSocket.connect(path: daemon.socketPath)
            var poller = pollfd(fd: extra.rawValue, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 2000) == 1 { refused += 1 }
            extra.closeQuietly()
        }
        XCTAssertEqual(refused, 50)
        let status = try await probe.status()
        XCTAssertEqual(status.clients.count, 1000)
        held.forEach { $0.closeQuietly() }
        held = []
        for _ in 0..<2000 { try SeqpacketSocket.connect(path: daemon.socketPath).closeQuietly() }
        // Back to the baseline once the daemon has seen every close (refused sockets linger 1 s).
        let deadline = Date().addingTimeInterval(20)
        var descriptors = Int.max
        while Date() < deadline {
            descriptors = try descriptorCount(of: daemon.pid)
            if descriptors <= baselineFDs { break }
            usleep(100_000)
        }
        XCTAssertLessThanOrEqual(descriptors, baselineFDs, "descriptors back to the baseline")
        let rss = try residentKiB(of: daemon.pid)
        XCTAssertLessThan(rss - baselineRSS, 16 * 1024, "RSS \(baselineRSS) KiB -> \(rss) KiB")
        let after = try await probe.status()
        XCTAssertEqual(after.clients.count, 1)
        XCTAssertGreaterThanOrEqual(after.counters.clientsRefused, 50)
        probe.close()
    }

    func residentKiB(of pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }
}

/// The testkit's self-checking payloads, for tests that publish from this process.
enum SelfCheckingPayloadForTests {
    static func make(seed: UInt64, length: Int) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        var bytes = [UInt8](repeating: 0, count: length)
        withUnsafeBytes(of: seed.littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
        for index in 8..<length {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            bytes[index] = UInt8(truncatingIfNeeded: state)
        }
        return bytes
    }

    static func verify(_ bytes: [UInt8]) -> UInt64? {
        guard bytes.count >= 8 else { return nil }
        let seed = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        return make(seed: seed, length: bytes.count) == bytes ? seed : nil
    }
}
