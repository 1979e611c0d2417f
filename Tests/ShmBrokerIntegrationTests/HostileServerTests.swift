import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import XCTest

/// The Swift client against a hostile owner (Tests/hostile/server.py; issue 17, items 4 and 5):
/// whoever takes the socket path first must not be able to crash a reader with a descriptor
/// shorter than it claims, an unsealed one, a header whose sizes wrap, or a report length that
/// its file does not hold. Each scenario ends in an error message, never a signal.
final class HostileServerTests: XCTestCase {
    static let server = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("hostile/server.py").path

    func withHostileServer(_ scenario: String, _ body: (String) throws -> Void) throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("needs python3") }
        let directory = "/tmp/shmbroker-hostile-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socketPath = directory + "/control.sock"
        let server = try ChildProcess("/usr/bin/python3", [Self.server, socketPath, scenario])
        defer {
            server.signal(SIGKILL)
            _ = server.finish(timeout: 10)
        }
        let deadline = Date().addingTimeInterval(20)
        while server.stdoutLineCount == 0 && Date() < deadline { usleep(20_000) }  // "listening"
        try body(socketPath)
    }

    func testHostileSegmentDescriptorsAreRefusedNotMapped() throws {
        for scenario in ["short-file", "short-sealed", "huge-capacity", "unsealed", "short-board", "pipe", "bad-blocks"] {
            try withHostileServer(scenario) { socketPath in
                let read = try runToCompletion(Binaries.ctl, ["read", "hostile", "--socket", socketPath], timeout: 60)
                XCTAssertLessThan(read.status, 128, "\(scenario): the reader died of signal \(read.status - 128): \(read.stderr)")
                XCTAssertNotEqual(read.status, 0, "\(scenario): \(read.stdout)")
                XCTAssertTrue(read.stderr.contains("protocol violation") || read.stderr.contains("header"),
                              "\(scenario): \(read.stderr)")
            }
        }
    }

    /// Issue 20: a segment whose second block does not match its checksum table (the whole CRC is
    /// right): a block read reports block 1 and hands on only block 0; a whole read succeeds.
    func testABlockReadReportsACorruptBlockBeforeHandingItOn() async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("needs python3") }
        let directory = "/tmp/shmbroker-hostile-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socketPath = directory + "/control.sock"
        let server = try ChildProcess("/usr/bin/python3", [Self.server, socketPath, "corrupt-block"])
        defer {
            server.signal(SIGKILL)
            _ = server.finish(timeout: 10)
        }
        let deadline = Date().addingTimeInterval(20)
        while server.stdoutLineCount == 0 && Date() < deadline { usleep(20_000) }
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "blocks")
        defer { client.close() }
        let handle = try await client.open("hostile")
        XCTAssertEqual(handle.reader.layout.checksumBlockSize, 4096)
        var handed: [Int] = []
        XCTAssertThrowsError(try handle.readBlocks { handed.append($0.offset) }) { error in
            guard case .segment(.blockChecksumMismatch(version: 1, block: 1, _, _))? = error as? ShmBrokerClientError else {
                return XCTFail("\(error)")
            }
        }
        XCTAssertEqual(handed, [0], "the corrupt block and the one after it never reached the consumer")
        XCTAssertEqual(try handle.read()?.bytes.count, 8192 + 100, "the whole CRC is right, so a whole read succeeds")
    }

    func testAStatusFileShorterThanAnnouncedIsRefused() throws {
        for scenario in ["status-overflow", "status-long"] {
            try withHostileServer(scenario) { socketPath in
                let status = try runToCompletion(Binaries.ctl, ["status", "--socket", socketPath], timeout: 60)
                XCTAssertLessThan(status.status, 128, "\(scenario): \(status.stderr)")
                XCTAssertNotEqual(status.status, 0)
                XCTAssertTrue(status.stderr.contains("shorter than"), "\(scenario): \(status.stderr)")
            }
        }
    }
}
