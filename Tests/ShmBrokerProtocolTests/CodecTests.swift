import ShmBrokerProtocol
import XCTest

final class CodecTests: XCTestCase {
    func roundTrip(_ request: Request, file: StaticString = #filePath, line: UInt = #line) throws {
        let frame = request.encode(requestID: 42)
        try frame.withUnsafeBytes { bytes in
            let header = try FrameHeader.parse(bytes)
            XCTAssertEqual(header.requestID, 42, file: file, line: line)
            XCTAssertEqual(header.type, request.type.rawValue, file: file, line: line)
            XCTAssertEqual(try Request.decode(type: header.type, body: Frame.body(of: bytes)), request, file: file, line: line)
        }
    }

    func roundTrip(_ message: ServerMessage, file: StaticString = #filePath, line: UInt = #line) throws {
        let frame = message.encode(requestID: 7)
        try frame.withUnsafeBytes { bytes in
            let header = try FrameHeader.parse(bytes)
            XCTAssertEqual(try ServerMessage.decode(type: header.type, body: Frame.body(of: bytes)), message, file: file, line: line)
        }
    }

    func testEveryRequestRoundTrips() throws {
        try roundTrip(.hello(protocolVersion: 1, clientName: "tester ✓"))
        try roundTrip(.open(segment: "a.b_c-d"))
        try roundTrip(.subscribe(segment: "x"))
        try roundTrip(.unsubscribe(segment: "x"))
        try roundTrip(.publish(segment: "x", payload: .inline([])))
        try roundTrip(.publish(segment: "x", payload: .inline([0, 1, 2, 255])))
        try roundTrip(.publish(segment: "x", payload: .attachedFile(length: 1 << 33)))
        try roundTrip(.status)
        try roundTrip(.attachRing(segment: "x"))
        try roundTrip(.detachRing(segment: "x"))
        try roundTrip(.metrics)
    }

    func testEveryServerMessageRoundTrips() throws {
        let info = PublishReceipt(version: 9, length: 3, crc64: 0xDEAD_BEEF, publishedAtNanoseconds: 1_700_000_000_000_000_000)
        try roundTrip(.ok)
        try roundTrip(.helloOK(protocolVersion: 1, maximumFrameSize: 65536, daemonVersion: "0.1.0"))
        try roundTrip(.opened(OpenedSegment(capacity: 10, slotCount: 3, layoutVersion: 1, mappingSize: 4096, latestVersion: 5)))
        try roundTrip(.subscribed(info))
        try roundTrip(.published(info))
        try roundTrip(.statusReport(json: Array("{}".utf8)))
        try roundTrip(.statusReportFile(length: 300_000))
        try roundTrip(.ringAttached(capacity: 1 << 20, latestVersion: 42))
        try roundTrip(.metricsReport(text: Array("shmbroker_clients 1\n".utf8)))
        try roundTrip(.metricsReportFile(length: 70_000))
        try roundTrip(.error(ProtocolError(.noSuchSegment, "no segment named \"q\"")))
        try roundTrip(.versionEvent(segment: "s", info))
        try roundTrip(.retiredEvent(segment: "s"))
    }

    /// The bytes of a documented example in docs/PROTOCOL.md, so the document cannot drift.
    func testDocumentedOpenExampleBytes() {
        XCTAssertEqual(Request.open(segment: "telemetry").encode(requestID: 2),
                       [0x02, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x0B, 0x00, 0x00, 0x00,
                        0x09, 0x00] + Array("telemetry".utf8))
    }

    /// The error decoding `body` as a request of `type`, or nil if it decoded.
    func decodingError(type: UInt16, body: [UInt8]) -> ProtocolError? {
        body.withUnsafeBytes { bytes -> ProtocolError? in
            do {
                _ = try Request.decode(type: type, body: bytes)
                return nil
            } catch {
                return error as? ProtocolError
            }
        }
    }

    func expectMalformed(type: MessageType, body: [UInt8], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(decodingError(type: type.rawValue, body: body)?.code, .malformedFrame, file: file, line: line)
    }

    func testMalformedBodiesAreRejectedPrecisely() {
        expectMalformed(type: .hello, body: [1, 0])
        expectMalformed(type: .open, body: [3, 0, 0x61])
        expectMalformed(type: .open, body: [1, 0, 0xFF])
        expectMalformed(type: .open, body: [1, 0, 0x61, 0x00])
        expectMalformed(type: .publish, body: [1, 0, 0x61, 2])
        expectMalformed(type: .publish, body: [1, 0, 0x61, 1, 0, 0])
        expectMalformed(type: .status, body: [1])
        XCTAssertEqual(decodingError(type: 0x1234, body: [])?.code, .unknownMessageType)
    }

    func testHeaderChecks() {
        for frame: [UInt8] in [[], [1, 0, 0, 0], [6, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0], [6, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]] {
            let error = frame.withUnsafeBytes { bytes -> ProtocolError? in
                do {
                    _ = try FrameHeader.parse(bytes)
                    return nil
                } catch {
                    return error as? ProtocolError
                }
            }
            XCTAssertEqual(error?.code, .malformedFrame, "\(frame)")
        }
    }

    func testErrorCodesAreStable() {
        XCTAssertEqual(ErrorCode.allCases.map(\.rawValue), Array(1...20))
        XCTAssertEqual(ErrorCode.descriptorLimit.name, "descriptor-limit")
        XCTAssertEqual(ErrorCode.ownerPublishes.name, "owner-publishes")
        XCTAssertEqual(ErrorCode.invalidRing.name, "invalid-ring")
        XCTAssertEqual(ErrorCode.permissionDenied.name, "permission-denied")
        XCTAssertEqual(ControlProtocol.maximumInlinePayload(nameLength: 9), 65536 - 12 - 2 - 9 - 1)
    }
}
