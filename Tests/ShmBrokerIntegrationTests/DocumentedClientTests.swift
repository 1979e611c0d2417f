import Foundation
import ShmBrokerClient
import XCTest

/// The Python reader in docs/examples was written from docs/ alone; it must work against the daemon.
final class DocumentedClientTests: XCTestCase {
    func testPythonReaderFromTheDocsReadsAndFollowsVersions() async throws {
        guard let python = pythonInterpreters().first else {
            throw XCTSkip("python3 is not installed")
        }
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/examples/reader.py").path
        let daemon = try TestDaemon(segments: [segment("doc", size: "1KiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let first = try await client.publish("doc", bytes: Array("from the docs".utf8))

        let reader = try ChildProcess(python, [script, daemon.socketPath, "doc", "--watch", "2"])
        try await waitUntil { try await client.status().segments[0].subscribers == 1 }
        let second = try await client.publish("doc", bytes: [0, 1, 2])
        try await waitUntil { reader.stdoutLineCount >= 2 }
        let third = try await client.publish("doc", bytes: [])
        let result = reader.finish(timeout: 30)
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        XCTAssertEqual(lines.count, 3, result.stdout)
        let latest = lines.first?["latest"] as? [String: Any]
        XCTAssertEqual(latest?["version"] as? Int, Int(first.version))
        XCTAssertEqual(latest?["crc64"] as? String, String(format: "%016llx", first.crc64))
        XCTAssertEqual(latest?["content"] as? String, Array("from the docs".utf8).map { String(format: "%02x", $0) }.joined())
        XCTAssertEqual(lines.dropFirst().map { $0["event"] as? Int }, [Int(second.version), Int(third.version)])
        XCTAssertEqual((lines.last?["read"] as? [String: Any])?["length"] as? Int, 0)
    }

    func testShippedConfigsMatchTheJSONSchema() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let check = """
        import json, sys
        import jsonschema
        schema = json.load(open(sys.argv[1]))
        jsonschema.Draft202012Validator.check_schema(schema)
        for path in sys.argv[2:]:
            jsonschema.validate(json.load(open(path)), schema)
        bad = {"socket": {"path": "/x"}, "segments": [{"name": "a b", "size": "1XB"}]}
        try:
            jsonschema.validate(bad, schema)
            sys.exit("schema accepted an invalid config")
        except jsonschema.ValidationError:
            print("ok")
        """
        guard let python = pythonInterpreters().first(where: { (try? runToCompletion($0, ["-c", "import jsonschema"]))?.status == 0 }) else {
            throw XCTSkip("python3 with jsonschema is not installed")
        }
        let result = try runToCompletion(python, ["-c", check, root.appendingPathComponent("config/shmbroker.schema.json").path,
                                                  root.appendingPathComponent("config/example.json").path,
                                                  root.appendingPathComponent("config/shmbroker.json").path])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stdout, "ok\n")
    }
}

/// Every python3 on PATH (then the usual places), in order.
func pythonInterpreters() -> [String] {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let candidates = path.split(separator: ":").map { "\($0)/python3" } + ["/usr/bin/python3", "/usr/local/bin/python3"]
    var seen = Set<String>()
    return candidates.filter { FileManager.default.isExecutableFile(atPath: $0) && seen.insert($0).inserted }
}
