import Foundation
import ShmBrokerProtocol
import XCTest

/// Every byte example in docs/PROTOCOL.md is what the codec produces, so a reader written from the
/// document speaks the real protocol.
final class DocumentedExamplesTests: XCTestCase {
    /// One example from the document: its bytes, and whether it ends in a placeholder (`<crc64 u64>`).
    struct Example {
        var bytes: [UInt8]
        var isPrefix: Bool
    }

    func documentedExamples() throws -> [Example] {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/PROTOCOL.md")
        let text = try String(contentsOf: path, encoding: .utf8)
        let section = text.components(separatedBy: "## Examples")[1].components(separatedBy: "\n## ")[0]
        var examples: [Example] = []
        var inCode = false
        for line in section.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("```") { inCode.toggle(); continue }
            guard inCode else { continue }
            let trimmed = line.drop { $0 == " " }
            let continuation = trimmed.hasPrefix("|")
            let tokens = trimmed.split(separator: " ").filter { $0 != "|" }
            guard let first = tokens.first, first.count == 2, UInt8(first, radix: 16) != nil || continuation else { continue }
            if !continuation { examples.append(Example(bytes: [], isPrefix: false)) }
            for token in tokens {
                guard token.count == 2, let byte = UInt8(token, radix: 16) else {
                    examples[examples.count - 1].isPrefix = true
                    break
                }
                if !examples[examples.count - 1].isPrefix { examples[examples.count - 1].bytes.append(byte) }
            }
        }
        return examples
    }

    func testEveryExampleMatchesTheCodec() throws {
        let info = PublishReceipt(version: 7, length: 5, crc64: 0x0123_4567_89AB_CDEF, publishedAtNanoseconds: 1)
        let expected: [[UInt8]] = [
            Request.hello(protocolVersion: 1, clientName: "reader").encode(requestID: 1),
            ServerMessage.helloOK(protocolVersion: 1, maximumFrameSize: 65536, daemonVersion: "shmbrokerd 0.2.0").encode(requestID: 1),
            Request.open(segment: "telemetry").encode(requestID: 2),
            ServerMessage.opened(OpenedSegment(capacity: 65536, slotCount: 3, layoutVersion: 2, mappingSize: 197_248, latestVersion: 7))
                .encode(requestID: 2),
            Request.subscribe(segment: "telemetry").encode(requestID: 3),
            ServerMessage.subscribed(info).encode(requestID: 3),
            ServerMessage.versionEvent(segment: "telemetry", PublishReceipt(version: 8, length: 5, crc64: 9, publishedAtNanoseconds: 9))
                .encode(requestID: 0),
            Request.publish(segment: "telemetry", payload: .inline(Array("hello".utf8))).encode(requestID: 4),
            ServerMessage.published(info).encode(requestID: 4),
            Request.publish(segment: "frames", payload: .attachedFile(length: 5_000_000)).encode(requestID: 5),
            Request.unsubscribe(segment: "telemetry").encode(requestID: 6),
            ServerMessage.ok.encode(requestID: 6),
            Request.status.encode(requestID: 7),
            ServerMessage.statusReport(json: Array("{}".utf8)).encode(requestID: 7),
            ServerMessage.error(ProtocolError(.noSuchSegment, "no segment named \"nope\"")).encode(requestID: 8),
            ServerMessage.retiredEvent(segment: "old").encode(requestID: 0),
        ]
        let documented = try documentedExamples()
        XCTAssertEqual(documented.count, expected.count, "one documented example per message checked here")
        for (index, (example, encoded)) in zip(documented, expected).enumerated() {
            if example.isPrefix {
                XCTAssertTrue(encoded.starts(with: example.bytes), "example \(index + 1): \(example.bytes) is not a prefix of \(encoded)")
                XCTAssertGreaterThanOrEqual(example.bytes.count, 8, "example \(index + 1) shows at least type and id")
            } else {
                XCTAssertEqual(example.bytes, encoded, "example \(index + 1)")
            }
        }
    }
}

/// The release version is written once (`ShmBrokerVersion`); the Makefile and the Debian package
/// script read it from there, and the Python package's two copies must say the same.
final class VersionTests: XCTestCase {
    func testEveryPackageSaysTheSameVersion() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        func text(_ path: String) throws -> String { try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8) }
        XCTAssertTrue(try text("Sources/python/pyproject.toml").contains("version = \"\(ShmBrokerVersion.string)\"\n"))
        XCTAssertTrue(try text("Sources/python/shmbroker/__init__.py").contains("__version__ = \"\(ShmBrokerVersion.string)\""))
        XCTAssertTrue(try text("Sources/libshmbroker/Makefile").contains("../ShmBrokerProtocol/Version.swift"))
        XCTAssertTrue(try text("systemd/build-deb.sh").contains("Sources/ShmBrokerProtocol/Version.swift"))
    }
}
