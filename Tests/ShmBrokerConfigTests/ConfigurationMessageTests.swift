import ShmBrokerConfig
import XCTest

/// Config messages a hostile-input campaign found wrong or weak, each corrected.
final class ConfigurationMessageTests: XCTestCase {
    func problems(_ text: [UInt8]) -> [String] {
        do {
            _ = try BrokerConfiguration.parse(text, file: "test.json", environment: [:])
            XCTFail("accepted: \(String(decoding: text, as: UTF8.self).prefix(200))")
            return []
        } catch {
            return error.problems.map(\.description)
        }
    }

    func problems(_ text: String) -> [String] { problems(Array(text.utf8)) }

    func testExponentsAndHugeNumbersAreNamedAsSuch() {
        let exponent = problems(#"{"socket": {"path": "/s"}, "limits": {"maxClients": 1e3}, "segments": []}"#)
        XCTAssertEqual(exponent.count, 1)
        XCTAssertTrue(exponent[0].contains("$.limits.maxClients") && exponent[0].contains("exponent notation"), exponent[0])
        XCTAssertFalse(exponent[0].contains("fraction"), exponent[0])
        let huge = problems(#"{"socket": {"path": "/s"}, "limits": {"maxClients": 123456789012345678901234567890}, "segments": []}"#)
        XCTAssertTrue(huge[0].contains("out of range"), huge[0])
        XCTAssertFalse(huge[0].contains("fraction"), huge[0])
        let fraction = problems(#"{"socket": {"path": "/s"}, "limits": {"maxClients": 2.5}, "segments": []}"#)
        XCTAssertTrue(fraction[0].contains("the fraction 2.5"), fraction[0])
        let size = problems(#"{"socket": {"path": "/s"}, "segments": [{"name": "a", "size": 4e3}]}"#)
        XCTAssertTrue(size[0].contains("$.segments[0].size") && size[0].contains("exponent notation"), size[0])
    }

    func testDotNamesAndNULsInTheSocketPathAreRefused() {
        for name in [".", ".."] {
            let found = problems(#"{"socket": {"path": "/s"}, "segments": [{"name": "\#(name)", "size": 64}]}"#)
            XCTAssertTrue(found.contains { $0.contains("$.segments[0].name") && $0.contains("reserved") }, "\(found)")
        }
        let nul = problems(#"{"socket": {"path": "/run/a\u0000b"}, "segments": []}"#)
        XCTAssertTrue(nul.contains { $0.contains("$.socket.path") && $0.contains("NUL") }, "\(nul)")
    }

    func testAByteOrderMarkIsSkipped() throws {
        let text = [0xEF, 0xBB, 0xBF] + Array(#"{"socket": {"path": "/s"}, "segments": [{"name": "a", "size": 64}]}"#.utf8)
        let config = try BrokerConfiguration.parse(text, file: "bom.json", environment: [:])
        XCTAssertEqual(config.segments.map(\.name), ["a"])
    }

    func testProblemsAreCappedWithACount() {
        let segments = (0..<5000).map { _ in #"{"name": "same", "size": 64}"# }.joined(separator: ",")
        let found = problems(#"{"socket": {"path": "/s"}, "segments": [\#(segments)]}"#)
        XCTAssertEqual(found.count, ConfigurationError.maximumReported + 1)
        XCTAssertTrue(found.last?.contains("\(4999 - ConfigurationError.maximumReported) more problems not listed") == true, found.last ?? "")
    }

    func testPublishRingSpinningIsAWholeNumberOfMicrosecondsUpToASecond() throws {
        let config = try BrokerConfiguration.parse(Array(#"""
            {"socket": {"path": "/s"}, "publishRings": {"spinMicroseconds": 250}, "segments": [{"name": "a", "size": 64}]}
            """#.utf8), file: "t", environment: [:])
        XCTAssertEqual(config.publishRings.spinMicroseconds, 250)
        XCTAssertEqual(try BrokerConfiguration.parse(Array(#"{"socket": {"path": "/s"}, "segments": []}"#.utf8), file: "t", environment: [:])
            .publishRings.spinMicroseconds, 0, "off unless asked for")
        for bad in ["-1", "1000001", "2.5", "\"fast\""] {
            let found = problems(#"{"socket": {"path": "/s"}, "publishRings": {"spinMicroseconds": \#(bad)}, "segments": []}"#)
            XCTAssertTrue(found.contains { $0.contains("$.publishRings.spinMicroseconds") }, "\(bad): \(found)")
        }
        let unknown = problems(#"{"socket": {"path": "/s"}, "publishRings": {"spin": true}, "segments": []}"#)
        XCTAssertTrue(unknown.contains { $0.contains("spin") }, "\(unknown)")
    }

    func testReserveIsABooleanAndDefaultsToTrue() throws {
        let config = try BrokerConfiguration.parse(Array(#"""
            {"socket": {"path": "/s"}, "segments": [{"name": "a", "size": 64}, {"name": "b", "size": 64, "reserve": false}]}
            """#.utf8), file: "t", environment: [:])
        XCTAssertEqual(config.segments.map(\.reservesMemory), [true, false])
        let wrong = problems(#"{"socket": {"path": "/s"}, "segments": [{"name": "a", "size": 64, "reserve": "no"}]}"#)
        XCTAssertTrue(wrong[0].contains("$.segments[0].reserve"), wrong[0])
    }
}
