import Foundation
import ShmBrokerClient
import XCTest

/// The readers in docs/examples were written from docs/ alone; they must work against the daemon.
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

    /// The C reader in docs/examples, also written from docs/ alone, waits on the segment's futex
    /// word in its read-only mapping: after OPEN it sends nothing, yet sees every new version.
    func testCReaderFromTheDocsWaitsOnTheFutex() async throws {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        guard let compiler = ["cc", "gcc", "clang"].lazy.flatMap({ name in path.split(separator: ":").map { "\($0)/\(name)" } })
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw XCTSkip("no C compiler (cc, gcc or clang) on PATH")
        }
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/examples/reader.c").path
        let binary = FileManager.default.temporaryDirectory.appendingPathComponent("shmbroker-reader-c-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: binary) }
        let build = try runToCompletion(compiler, ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, source])
        XCTAssertEqual(build.status, 0, "the documented example must compile without warnings: \(build.stderr)")

        let daemon = try TestDaemon(segments: [segment("doc-c", size: "1KiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let first = try await client.publish("doc-c", bytes: Array("from the docs".utf8))
        let reader = try ChildProcess(binary, [daemon.socketPath, "doc-c", "2"])
        try await waitUntil { reader.stdoutLineCount >= 1 }
        let second = try await client.publish("doc-c", bytes: [0, 1, 2])
        try await waitUntil { reader.stdoutLineCount >= 2 }
        let status = try await client.status()
        let entry = try XCTUnwrap(status.clients.first { $0.name == "reader.c" })
        XCTAssertEqual(entry.opened, ["doc-c"])
        XCTAssertEqual(entry.subscriptions, [], "the C reader is woken by the futex, not by events")
        let third = try await client.publish("doc-c", bytes: [])
        let result = reader.finish(timeout: 30)
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        XCTAssertEqual(lines.map { $0["version"] as? Int }, [first, second, third].map { Int($0.version) }, result.stdout)
        XCTAssertEqual(lines.map { $0["crc64"] as? String }, [first, second, third].map { String(format: "%016llx", $0.crc64) })
        XCTAssertEqual(lines.map { $0["content"] as? String }, ["66726f6d2074686520646f6373", "000102", ""])

        let missing = try runToCompletion(binary, [daemon.socketPath, "nope"])
        XCTAssertEqual(missing.status, 2)
        XCTAssertTrue(missing.stderr.contains("error 5"), missing.stderr)
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
                                                  root.appendingPathComponent("config/shmbroker.json").path,
                                                  root.appendingPathComponent("config/sysload.json").path])
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
