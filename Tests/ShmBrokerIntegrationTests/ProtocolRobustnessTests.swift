import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// Malformed, oversized and hostile input gets a precise error for that client only; the daemon
/// and every other client carry on.
final class ProtocolRobustnessTests: XCTestCase {
    var daemon: TestDaemon!
    var bystander: ShmBrokerClient!

    override func setUp() async throws {
        daemon = try TestDaemon(segments: [segment("data", size: 1024)])
        bystander = try await daemon.connect()
        _ = try await bystander.subscribe("data")
    }

    override func tearDown() async throws {
        // Every test ends by proving the daemon and an unrelated client are unaffected.
        let receipt = try await bystander.publish("data", bytes: Array("still fine".utf8))
        let handle = try await bystander.open("data")
        XCTAssertEqual(try handle.read()?.version, receipt.version)
        bystander.close()
        let exit = daemon.stop()
        XCTAssertEqual(exit.status, 0, "daemon exit after SIGTERM: \(exit.stderr)")
    }

    func frame(type: UInt16, id: UInt32 = 9, flags: UInt16 = 0, body: [UInt8], declaredLength: UInt32? = nil) -> [UInt8] {
        var writer = ByteWriter()
        writer.write(type)
        writer.write(flags)
        writer.write(id)
        writer.write(declaredLength ?? UInt32(body.count))
        writer.write(raw: body)
        return writer.bytes
    }

    func expectError(_ connection: RawConnection, _ bytes: [UInt8], _ code: ErrorCode, descriptors: [FileDescriptor] = [],
                     file: StaticString = #filePath, line: UInt = #line) throws {
        try connection.send(bytes, descriptors: descriptors)
        guard let (_, message, _) = try connection.receive() else { return XCTFail("disconnected", file: file, line: line) }
        guard case .error(let error) = message else { return XCTFail("expected \(code.name), got \(message)", file: file, line: line) }
        XCTAssertEqual(error.code, code, error.message, file: file, line: line)
        XCTAssertFalse(error.message.isEmpty, file: file, line: line)
    }

    func testMalformedFramesGetPreciseErrorsAndTheConnectionSurvives() throws {
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try expectError(raw, [1, 2, 3], .malformedFrame)
        try expectError(raw, Request.status.encode(requestID: 1), .handshakeRequired)
        try expectError(raw, Request.hello(protocolVersion: 99, clientName: "future").encode(requestID: 2), .unsupportedProtocolVersion)
        try raw.hello()
        try expectError(raw, frame(type: 0x0777, body: []), .unknownMessageType)
        try expectError(raw, frame(type: MessageType.versionEvent.rawValue, body: []), .unknownMessageType)
        try expectError(raw, frame(type: MessageType.status.rawValue, body: [], declaredLength: 50), .malformedFrame)
        try expectError(raw, frame(type: MessageType.status.rawValue, flags: 1, body: []), .malformedFrame)
        try expectError(raw, frame(type: MessageType.status.rawValue, body: [0]), .malformedFrame)
        try expectError(raw, frame(type: MessageType.open.rawValue, body: [5, 0, 0x64]), .malformedFrame)  // name cut short
        try expectError(raw, frame(type: MessageType.open.rawValue, body: [2, 0, 0xC3, 0x28]), .malformedFrame)  // bad UTF-8
        try expectError(raw, frame(type: MessageType.open.rawValue, body: [4, 0] + Array("data".utf8) + [0]), .malformedFrame)
        try expectError(raw, frame(type: MessageType.publish.rawValue, body: [4, 0] + Array("data".utf8) + [7]), .malformedFrame)
        try expectError(raw, Request.open(segment: "../etc").encode(requestID: 3), .invalidSegmentName)
        try expectError(raw, Request.open(segment: "missing").encode(requestID: 4), .noSuchSegment)
        try expectError(raw, Request.unsubscribe(segment: "data").encode(requestID: 5), .notSubscribed)
        // After all that, the same connection still works.
        guard case .statusReport(let json) = try raw.request(.status) else { return XCTFail("status failed") }
        let report = try StatusReport.decode(json)
        XCTAssertGreaterThanOrEqual(report.counters.malformedRequests, 9)
    }

    func testOversizedFrameIsRefusedWithItsLimit() throws {
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let body = [4, 0] + Array("data".utf8) + [0] + [UInt8](repeating: 0xAB, count: 100_000)
        try raw.send(frame(type: MessageType.publish.rawValue, body: body))
        guard let (_, message, _) = try raw.receive(), case .error(let error) = message else { return XCTFail("no error reply") }
        XCTAssertEqual(error.code, .frameTooLarge)
        XCTAssertTrue(error.message.contains("65536"), error.message)
        guard case .statusReport(let json) = try raw.request(.status) else { return XCTFail("status failed") }
        XCTAssertEqual(try StatusReport.decode(json).segments.first?.version, 0, "nothing was published")
        // Exactly one byte over the limit (it fits the receive buffer, so the kernel does not truncate it).
        for size in [65_537, 65_538] {
            let header = 12, prefix = 2 + 4 + 1
            let filler = [UInt8](repeating: 0xCD, count: size - header - prefix)
            try raw.send(frame(type: MessageType.publish.rawValue, body: [4, 0] + Array("data".utf8) + [0] + filler))
            guard let (_, reply, _) = try raw.receive(), case .error(let refusal) = reply else { return XCTFail("no error reply") }
            XCTAssertEqual(refusal.code, .frameTooLarge, "a frame of \(size) bytes: \(refusal)")
        }
    }

    func testPayloadLargerThanCapacityIsRefusedAndNothingIsWritten() async throws {
        try await bystander.publish("data", bytes: Array("keep me".utf8))
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let reply = try raw.request(.publish(segment: "data", payload: .inline([UInt8](repeating: 1, count: 1025))))
        guard case .error(let error) = reply else { return XCTFail("accepted an oversize payload") }
        XCTAssertEqual(error.code, .payloadTooLarge)
        XCTAssertTrue(error.message.contains("1025") && error.message.contains("1024"), error.message)
        let handle = try await bystander.open("data")
        XCTAssertEqual(try handle.read()?.bytes, Array("keep me".utf8))
    }

    func testDescriptorsAreCheckedAndUnexpectedOnesClosed() throws {
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let before = try descriptorCount(of: daemon.pid)
        let memfd = try [UInt8](repeating: 3, count: 10).withUnsafeBytes { try MemoryFile.create(name: "stray", contents: $0) }
        defer { memfd.closeQuietly() }
        for _ in 0..<20 {
            try expectError(raw, Request.status.encode(requestID: 7), .unexpectedDescriptor, descriptors: [memfd])
            // More descriptors than any request takes (the kernel truncates them): refused, closed.
            try expectError(raw, Request.attachRing(segment: "data").encode(requestID: 9), .unexpectedDescriptor,
                            descriptors: [memfd, memfd, memfd])
            // A refused ATTACH_RING (an unsealed file is no ring) closes both of its descriptors.
            try expectError(raw, Request.attachRing(segment: "data").encode(requestID: 10), .invalidRing, descriptors: [memfd, memfd])
        }
        XCTAssertLessThanOrEqual(try descriptorCount(of: daemon.pid), before, "the daemon closed the stray descriptors")

        try expectError(raw, Request.publish(segment: "data", payload: .attachedFile(length: 10)).encode(requestID: 8), .missingDescriptor)
        var pipeEnds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pipeEnds), 0)
        defer { close(pipeEnds[0]); close(pipeEnds[1]) }
        try expectError(raw, Request.publish(segment: "data", payload: .attachedFile(length: 10)).encode(requestID: 9), .badDescriptor,
                        descriptors: [FileDescriptor(rawValue: pipeEnds[0])])
        try expectError(raw, Request.publish(segment: "data", payload: .attachedFile(length: 11)).encode(requestID: 10), .badDescriptor,
                        descriptors: [memfd])
        try expectError(raw, Request.publish(segment: "data", payload: .attachedFile(length: 5000)).encode(requestID: 11), .payloadTooLarge,
                        descriptors: [memfd])
        guard case .published(let info) = try raw.request(.publish(segment: "data", payload: .attachedFile(length: 10)), descriptors: [memfd]) else {
            return XCTFail("a valid attached-file publish failed")
        }
        XCTAssertEqual(info.length, 10)
        XCTAssertEqual(info.version, 1, "none of the refused publishes made a version")
    }

    /// A shrink-sealed staging file is mapped once and reused: each publish must still carry the
    /// file's current bytes, including after the file grows.
    func testReusedSealedStagingFileAlwaysPublishesItsCurrentContent() async throws {
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let staging = try MemoryFile.createScratch(name: "staging", sealedAgainstShrinking: true)
        defer { staging.closeQuietly() }
        let handle = try await bystander.open("data")
        for (round, length) in [100, 100, 700, 1024, 10].enumerated() {
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &+ round &* 37) }
            try payload.withUnsafeBytes { try staging.writeFully($0, atOffset: 0) }
            guard case .published(let info) = try raw.request(.publish(segment: "data", payload: .attachedFile(length: UInt64(length))),
                                                              descriptors: [staging]) else {
                return XCTFail("round \(round) was refused")
            }
            XCTAssertEqual(info.crc64, CRC64.checksum(payload), "round \(round)")
            XCTAssertEqual(try handle.read()?.bytes, payload, "round \(round)")
        }
        XCTAssertNotEqual(ftruncate(staging.rawValue, 0), 0, "the seal keeps anyone from shrinking the mapped file")
    }

    func testClientsBeyondTheLimitAreRefusedWithAReason() async throws {
        let limited = try TestDaemon(segments: [segment("x", size: 8)], limits: ["maxClients": 2])
        defer { limited.stop() }
        let first = try await limited.connect()
        let second = try await limited.connect()
        do {
            _ = try await ShmBrokerClient.connect(socketPath: limited.socketPath, options: .init(reconnects: false))
            XCTFail("a third client was accepted")
        } catch {
            XCTAssertEqual(error.code, .tooManyClients, "\(error)")
        }
        let refused = try await first.status().counters.clientsRefused
        XCTAssertEqual(refused, 1)
        second.close()
        try await waitUntil { try await first.status().clients.count == 1 }
        let third = try await limited.connect()
        let connected = try await third.status().clients.count
        XCTAssertEqual(connected, 2)
    }

    func testRandomGarbageNeverTakesTheDaemonDown() throws {
        var generator = SplitMix64(seed: 0x5EED)
        for round in 0..<20 {
            let raw = try RawConnection(socketPath: daemon.socketPath)
            if round % 2 == 0 { try raw.hello() }
            for _ in 0..<100 {
                // (A zero-length message reads as end-of-connection on SOCK_SEQPACKET; PROTOCOL.md says so.)
                let length = 1 + Int(generator.next() % 200)
                var bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
                if bytes.count >= 12 && generator.next() % 2 == 0 {
                    // Plausible headers reach the body decoders, not just the header check.
                    bytes[0] = UInt8(generator.next() % 7)
                    bytes[1] = 0; bytes[2] = 0; bytes[3] = 0
                    let body = UInt32(bytes.count - 12)
                    withUnsafeBytes(of: body.littleEndian) { bytes.replaceSubrange(8..<12, with: $0) }
                }
                try raw.send(bytes)
                guard try raw.receive() != nil else { return XCTFail("daemon dropped a client over garbage") }
            }
        }
    }
}

/// The number of open descriptors of a process.
func descriptorCount(of pid: Int32) throws -> Int {
    try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count
}

/// A small deterministic generator, so a failing fuzz round can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
