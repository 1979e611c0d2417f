import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// What an unprivileged user could learn or break through the control channel (issue 17, items
/// 6, 7, 10, 13; item 17 is in SecurityRegressionTests): hidden segments' activity in
/// daemon-wide counters, the existence of hidden names, a journal flooded with refusals, refusals
/// lost in a burst.
final class DisclosureTests: XCTestCase {
    static let python = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Sources/python").path

    /// Runs a Python script as `nobody` with the shmbroker package importable; `sys.argv[1]` is the socket.
    func asNobody(_ script: String, socket: String) throws -> ProcessResult {
        try runToCompletion("/usr/bin/python3", ["-c", "import sys; sys.path.insert(0, '\(Self.python)'); import shmbroker\n" + script, socket],
                            asNobody: true, timeout: 120)
    }

    /// Item 6: root publishing to a segment `nobody` may not read changes nothing `nobody` sees in
    /// STATUS or METRICS; its own segment's publishes are counted as before.
    func testHiddenSegmentsActivityDoesNotShowInCountersOthersSee() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("public", size: 64, publishers: ["*"]), segment("secret", size: 64, readers: [0])])
        defer { daemon.stop() }
        let root = try await daemon.connect()
        defer { root.close() }
        let first = try asNobody("c = shmbroker.connect(sys.argv[1]).status()['counters']; print(c['publishes'], c['eventsSent'])",
                                 socket: daemon.socketPath)
        XCTAssertEqual(first.status, 0, first.stderr)
        let subscriber = try await daemon.connect()
        _ = try await subscriber.subscribe("secret")
        for index in 0..<25 { try await root.publish("secret", bytes: [UInt8(index)]) }
        try await root.publish("public", bytes: [1])
        let second = try asNobody("c = shmbroker.connect(sys.argv[1]).status()['counters']; print(c['publishes'], c['eventsSent'])",
                                  socket: daemon.socketPath)
        XCTAssertEqual(second.status, 0, second.stderr)
        let before = first.stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        let after = second.stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertEqual(after.first.map { $0 - (before.first ?? 0) }, 1, "only the public publish is counted: \(first.stdout) → \(second.stdout)")
        XCTAssertEqual(after.last, before.last, "events to the hidden segment's subscriber are not counted")
        let rootStatus = try await root.status()
        XCTAssertGreaterThanOrEqual(rootStatus.counters.publishes, 26, "root still sees the daemon-wide totals")
        let metrics = try runToCompletion(Binaries.ctl, ["metrics", "--socket", daemon.socketPath], asNobody: true)
        XCTAssertFalse(metrics.stdout.contains("shmbroker_event_loop_iterations_total"), metrics.stdout)
        XCTAssertTrue(metrics.stdout.contains(#"shmbroker_segment_publishes_total{segment="public"}"#), metrics.stdout)
        subscriber.close()
    }

    /// Item 10: a name `nobody` may not use gets exactly the answer of a name that does not exist,
    /// for OPEN, SUBSCRIBE and PUBLISH (ATTACH_RING looks names up the same way).
    func testAHiddenNameIsAnsweredLikeAnAbsentOne() throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("visible", size: 64), segment("hidden", size: 64, readers: [0])])
        defer { daemon.stop() }
        let script = """
        import array, os, socket
        client = shmbroker.connect(sys.argv[1])
        def answer(call):
            try:
                call()
                return 'accepted'
            except shmbroker.ShmBrokerError as error:
                return f'{error.code} {error.message}'
        for name in ('hidden', 'absent'):
            print(answer(lambda: client.open(name)).replace(name, 'NAME'))
            print(answer(lambda: client.subscribe(name)).replace(name, 'NAME'))
            print(answer(lambda: client.publish(name, b'x')).replace(name, 'NAME'))
        print(answer(lambda: client.publish('visible', b'x')))
        """
        let result = try asNobody(script, socket: daemon.socketPath)
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.count, 7, result.stdout)
        guard lines.count == 7 else { return }
        XCTAssertEqual(Array(lines[0..<3]), Array(lines[3..<6]), "hidden and absent are indistinguishable")
        XCTAssertTrue(lines[0].hasPrefix("5 "), lines[0])
        XCTAssertTrue(lines[6].hasPrefix("6 "), "a segment nobody may see but not publish to is still permission-denied: \(lines[6])")
        // And through the Swift client (shmbrokerctl).
        let ring = try runToCompletion(Binaries.ctl, ["publish", "hidden", "-", "--socket", daemon.socketPath], asNobody: true, stdin: Data("x".utf8))
        XCTAssertTrue(ring.stderr.contains("no-such-segment"), ring.stderr)
    }

    /// Items 7 and 13: a burst of 600 connections from one user over its limit: every refused
    /// client reads `too-many-clients` (none is reset unread, also past the 256 refusals held at
    /// once), and the journal gets a few lines and a count, not one line per refusal.
    func testABurstOfRefusedConnectionsIsAnsweredAndLoggedSparingly() throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("s", size: 64)], limits: ["maxClientsPerUser": 2])
        defer { daemon.stop() }
        let script = """
        import socket, struct, select
        hello = struct.pack('<HHII', 1, 0, 1, 4 + 2 + 5) + struct.pack('<I', 1) + struct.pack('<H', 5) + b'flood'
        sockets = []
        for _ in range(600):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            try:
                s.send(hello)
            except OSError:
                pass
            sockets.append(s)
        served = refused = lost = 0
        for s in sockets:
            s.settimeout(10)
            try:
                data = s.recv(65536)
            except OSError:
                data = b''
            if len(data) >= 14 and struct.unpack_from('<H', data)[0] == 0x80FF and struct.unpack_from('<H', data, 12)[0] == 16:
                refused += 1
            elif len(data) >= 12 and struct.unpack_from('<H', data)[0] == 0x8001:
                served += 1
            else:
                lost += 1
        print(served, refused, lost)
        """
        let result = try asNobody(script, socket: daemon.socketPath)
        XCTAssertEqual(result.status, 0, result.stderr)
        let counts = result.stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertEqual(counts, [2, 598, 0], "served, refused with a reason, lost: \(result.stdout)")
        sleep(2)  // the count of suppressed lines is logged once its second is over
        let log = daemon.stop().stderr
        let lines = log.split(separator: "\n").filter { $0.contains("client refused") }
        XCTAssertLessThanOrEqual(lines.count, 30, "refusals are rate-limited: \(lines.count) lines")
        XCTAssertTrue(log.contains("suppressed"), log)
    }
}
