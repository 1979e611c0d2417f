import ShmBrokerConfig
import XCTest

final class ConfigurationTests: XCTestCase {
    func parse(_ text: String, environment: [String: String] = [:]) throws -> BrokerConfiguration {
        try BrokerConfiguration.parse(Array(text.utf8), file: "test.json", environment: environment)
    }

    func problems(_ text: String, environment: [String: String] = [:]) -> [String] {
        do {
            _ = try parse(text, environment: environment)
            XCTFail("accepted: \(text)")
            return []
        } catch {
            return (error as? ConfigurationError)?.problems.map(\.description) ?? ["\(error)"]
        }
    }

    func testValidConfigWithEveryOption() throws {
        let config = try parse("""
        {"socket": {"path": "${RUNTIME:-/run}/s.sock", "mode": "0640", "user": "root", "group": 0},
         "limits": {"maxClients": 10, "subscriberStallTimeoutSeconds": 2.5},
         "segments": [{"name": "a", "size": "16MiB", "slots": 4, "readers": {"users": ["*"]},
                       "publishers": {"users": ["root", 1000], "groups": ["root"]}, "description": "d"},
                      {"name": "b.c_d-e", "size": 1}]}
        """, environment: ["RUNTIME": "/tmp/x"])
        XCTAssertEqual(config.socket.path, "/tmp/x/s.sock")
        XCTAssertEqual(config.socket.mode, 0o640)
        XCTAssertEqual(config.socket.owner, 0)
        XCTAssertEqual(config.limits.maximumClients, 10)
        XCTAssertEqual(config.limits.subscriberStallTimeoutSeconds, 2.5)
        XCTAssertEqual(config.segments.map(\.name), ["a", "b.c_d-e"])
        XCTAssertEqual(config.segments[0].capacity, 16 << 20)
        XCTAssertEqual(config.segments[0].slots, 4)
        XCTAssertTrue(config.segments[0].readers.everyone)
        XCTAssertEqual(config.segments[0].publishers.users, [0, 1000])
        XCTAssertEqual(config.segments[1].slots, BrokerConfiguration.defaultSlots)
        XCTAssertEqual(try parse(#"{"socket": {"path": "${UNSET:-/run}/s"}, "segments": []}"#).socket.path, "/run/s")
    }

    func testSizes() {
        XCTAssertEqual(BrokerConfiguration.parseSize("4096"), 4096)
        XCTAssertEqual(BrokerConfiguration.parseSize("64KiB"), 65536)
        XCTAssertEqual(BrokerConfiguration.parseSize("16 MiB"), 16 << 20)
        XCTAssertEqual(BrokerConfiguration.parseSize("1GiB"), 1 << 30)
        XCTAssertEqual(BrokerConfiguration.parseSize("10MB"), 10_000_000)
        XCTAssertNil(BrokerConfiguration.parseSize("1.5MiB"))
        XCTAssertNil(BrokerConfiguration.parseSize("-1"))
        XCTAssertNil(BrokerConfiguration.parseSize("12XB"))
        XCTAssertNil(BrokerConfiguration.parseSize("99999999999999999999GiB"))
    }

    func testEveryProblemIsReportedWithItsJSONPath() {
        let found = problems("""
        {"socket": {"path": "relative", "mode": "9"}, "bogus": true,
         "segments": [{"name": "ok", "size": "1KiB"},
                      {"name": "ok", "size": 5},
                      {"name": "", "size": "huge", "slots": 1, "extra": 1},
                      {"name": "x", "size": 0, "readers": {"users": ["no-such-user-q"], "groups": ["no-such-group-q"]}},
                      {"name": "y", "size": 2.5, "publishers": {"users": "root"}}]}
        """)
        let expected = [
            "$.bogus: unknown key",
            "$.socket.path: must be an absolute path",
            "$.socket.mode: expected an octal permission string",
            "$.segments[1].name: duplicate segment name \"ok\" (first defined at $.segments[0])",
            "$.segments[2].extra: unknown key",
            "$.segments[2].name: \"\" is not a valid name",
            "$.segments[2].size: expected a byte count",
            "$.segments[2].slots: 1 is out of range 2...16",
            "$.segments[3].size: size 0 bytes is out of range",
            "$.segments[3].readers.users[0]: unknown user \"no-such-user-q\"",
            "$.segments[3].readers.groups[0]: unknown group \"no-such-group-q\"",
            "$.segments[4].size: expected a whole number, found the fraction 2.5",
            "$.segments[4].publishers.users: expected an array",
        ]
        for message in expected {
            XCTAssertTrue(found.contains { $0.hasPrefix(message) }, "missing '\(message)' in \(found)")
        }
        XCTAssertEqual(found.count, expected.count, "\(found)")
    }

    func testMissingKeysWrongTypesAndSyntaxErrors() {
        XCTAssertEqual(problems("{}"), ["$.socket: required key is missing", "$.segments: required key is missing"])
        XCTAssertEqual(problems(#"{"socket": [], "segments": {}}"#),
                       ["$.socket: expected an object, found an array", "$.segments: expected an array, found an object"])
        XCTAssertEqual(problems(#"{"socket": {"path": "/a", "path": "/b"}, "segments": []}"#), ["$.socket.path: duplicate key"])
        XCTAssertEqual(problems(#"{"socket": {"path": "${NOPE}/s"}, "segments": []}"#).first?.hasPrefix("$.socket.path: environment variable NOPE is not set"), true)
        XCTAssertEqual(problems("{\n  \"socket\": ,\n}"), ["$: invalid JSON at line 2, column 13: unexpected character ','"])
        XCTAssertEqual(problems(#"{"a": 1} x"#), ["$: invalid JSON at line 1, column 10: unexpected content after the JSON value"])
        let longPath = "/" + String(repeating: "p", count: 120)
        XCTAssertTrue(problems(#"{"socket": {"path": "\#(longPath)"}, "segments": []}"#).first?.contains("at most 107") == true)
    }

    func testMissingFileIsAProblemNotACrash() {
        XCTAssertThrowsError(try BrokerConfiguration.load(path: "/nonexistent/shmbroker.json")) { error in
            XCTAssertEqual((error as? ConfigurationError)?.problems.first?.message, "the file does not exist")
        }
    }

    func testJSONParserHandlesEscapesAndNumbers() throws {
        let value = try JSONValue.parse(Array(#"{"s": "a\"b\\c\u00e9\ud83d\ude00\n", "n": -12.5e3, "t": true, "z": null, "l": [1, 2]}"#.utf8))
        guard case .object(let members) = value else { return XCTFail() }
        XCTAssertEqual(members.first { $0.key == "s" }?.value, .string("a\"b\\cé😀\n"))
        XCTAssertEqual(members.first { $0.key == "n" }?.value, .number("-12.5e3"))
        XCTAssertEqual(members.first { $0.key == "l" }?.value, .array([.number("1"), .number("2")]))
        XCTAssertThrowsError(try JSONValue.parse(Array(#"{"a": 01}"#.utf8)))
        XCTAssertThrowsError(try JSONValue.parse(Array("[\"\u{01}\"]".utf8)))
        XCTAssertThrowsError(try JSONValue.parse([0x22, 0xC3, 0x28, 0x22])) { error in
            XCTAssertEqual((error as? JSONValue.SyntaxError)?.message, "invalid UTF-8 in string")
        }
    }
}
