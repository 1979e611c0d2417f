import Foundation
import ShmBrokerConfig
@testable import ShmBrokerMirror
import XCTest

/// The mirror's config file: every problem with its JSON path, `${VAR}` expansion, secrets that
/// other users can read refused.
final class MirrorConfigurationTests: XCTestCase {
    var directory = ""

    override func setUp() {
        directory = "/tmp/shmbroker-mirror-config-\(getpid())-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func load(_ text: String, environment: [String: String] = [:]) throws -> MirrorConfiguration {
        let path = directory + "/mirror.json"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return try MirrorConfiguration.load(path: path, environment: environment)
    }

    func problems(_ text: String, environment: [String: String] = [:]) -> [String] {
        do {
            _ = try load(text, environment: environment)
            return []
        } catch let error as ConfigurationError {
            return error.problems.map(\.description)
        } catch {
            return ["\(error)"]
        }
    }

    func testAnExportAndImportConfigLoads() throws {
        let configuration = try load("""
            {"host": "${HOST}", "nats": {"servers": ["nats://10.0.0.1:4222"], "bucket": "frames"},
             "chunkSize": "512KiB", "staleAfterSeconds": 2,
             "export": {"socket": "/run/shmbroker/control.sock", "segments": ["a", "b"]},
             "import": {"socket": {"path": "/run/shmbroker-mirror/control.sock"},
                        "segments": [{"from": "cam-1", "segment": "frames", "name": "cam1-frames", "size": "16MiB",
                                      "readers": {"users": ["*"]}}]}}
            """, environment: ["HOST": "cam-2"])
        XCTAssertEqual(configuration.host, "cam-2")
        XCTAssertEqual(configuration.nats.bucket, "frames")
        XCTAssertEqual(configuration.chunkSize, 512 << 10)
        XCTAssertEqual(configuration.export?.segments, ["a", "b"])
        XCTAssertEqual(configuration.imports.first?.sourceHost, "cam-1")
        XCTAssertEqual(configuration.imports.first?.sourceSegment, "frames")
        XCTAssertEqual(configuration.imports.first?.definition.name, "cam1-frames")
        XCTAssertEqual(configuration.imports.first?.definition.capacity, 16 << 20)
        XCTAssertEqual(configuration.imports.first?.staleAfterSeconds, 2, "the top-level bound is the default")
    }

    func testEveryProblemIsReportedWithItsPath() {
        let found = problems("""
            {"host": "a.b", "nats": {"servers": ["http://x"], "bogus": 1}, "heartbeatIntervalSeconds": 5,
             "import": {"socket": {"path": "/tmp/s.sock"},
                        "segments": [{"from": "c", "name": "x", "size": "1KiB", "publishers": {"users": ["*"]}},
                                     {"from": "c", "name": "x", "size": "1KiB"},
                                     {"name": "y", "size": "1KiB"}]}}
            """)
        let expected = ["$.host", "$.nats.servers[0]", "$.nats.bogus", "$.heartbeatIntervalSeconds",
                        "$.import.segments[0].publishers", "$.import.segments[1].name", "$.import.segments[2].from"]
        for path in expected {
            XCTAssertTrue(found.contains { $0.hasPrefix(path + ":") }, "no problem at \(path) in \(found)")
        }
        XCTAssertTrue(problems(#"{"host": "a", "nats": {"servers": ["nats://x:4222"]}}"#).contains { $0.contains("nothing to do") })
        XCTAssertTrue(problems(#"{"host": "${NOPE}", "nats": {"servers": []}}"#).contains { $0.contains("NOPE is not set") })
    }

    func testSecretsOthersCanReadAreRefused() throws {
        let creds = directory + "/a.creds"
        try "-----BEGIN NATS USER JWT-----".write(toFile: creds, atomically: true, encoding: .utf8)
        chmod(creds, 0o644)
        let text = """
            {"host": "a", "nats": {"servers": ["nats://x:4222"], "credentials": {"credsFile": "\(creds)"}},
             "export": {"segments": ["s"]}}
            """
        XCTAssertTrue(problems(text).contains { $0.contains("$.nats.credentials.credsFile") && $0.contains("accessible by other users") },
                      "\(problems(text))")
        chmod(creds, 0o600)
        XCTAssertEqual(problems(text), [])
        let password = directory + "/password"
        try "s3cret\n".write(toFile: password, atomically: true, encoding: .utf8)
        chmod(password, 0o600)
        let configuration = try load("""
            {"host": "a", "nats": {"servers": ["nats://x:4222"], "credentials": {"user": "a", "passwordFile": "\(password)"}},
             "export": {"segments": ["s"]}}
            """)
        XCTAssertEqual(configuration.nats.credentials, .user("a", password: "s3cret"), "read from its file, without the newline")
    }
}
