import Foundation
import ShmBrokerProtocol
import XCTest

/// The STATUS_REPORT JSON documented in docs/PROTOCOL.md decodes, and so does an older daemon's.
final class StatusReportTests: XCTestCase {
    func documentedExample() throws -> String {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("docs/PROTOCOL.md")
        let document = try String(contentsOf: url, encoding: .utf8)
        let section = try XCTUnwrap(document.range(of: "## STATUS_REPORT JSON")).upperBound
        let start = try XCTUnwrap(document.range(of: "```json\n", range: section..<document.endIndex)).upperBound
        let end = try XCTUnwrap(document.range(of: "```", range: start..<document.endIndex)).lowerBound
        return String(document[start..<end])
    }

    func testTheDocumentedReportDecodes() throws {
        let report = try StatusReport.decode(Array(try documentedExample().utf8))
        XCTAssertEqual(report.segments.first?.name, "telemetry")
        XCTAssertEqual(report.clients.first?.opened, ["telemetry"])
        XCTAssertEqual(report.clients.first?.rings, [])
        XCTAssertEqual(report.counters.publishes, 8)
    }

    func testAReportWithoutRingsStillDecodes() throws {
        let older = try documentedExample().replacingOccurrences(of: ", \"rings\": []", with: "")
        XCTAssertFalse(older.contains("rings"))
        let report = try StatusReport.decode(Array(older.utf8))
        XCTAssertEqual(report.clients.first?.rings, [])
        XCTAssertEqual(report.clients.first?.subscriptions, [])
    }
}
