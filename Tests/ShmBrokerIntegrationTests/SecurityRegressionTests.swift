import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// Regression tests for what a hostile-input campaign found: STATUS told any local user every
/// segment's version and CRC and every client's identity; one user could take every client slot;
/// the daemon spun at its descriptor limit and blamed the client for its own EMFILE.
final class SecurityRegressionTests: XCTestCase {
    func testStatusShowsASegmentOnlyToItsReadersAndClientsOnlyToTheirOwnUser() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [
            segment("private", size: 64, readers: [0]),
            segment("public", size: 64, readers: ["*"]),
        ])
        defer { daemon.stop() }
        let root = try await daemon.connect()
        _ = try await root.open("private")
        try await root.publish("private", bytes: Array("abc".utf8))
        try await root.publish("public", bytes: Array("hello".utf8))

        let seen = try runToCompletion(Binaries.ctl, ["status", "--json", "--socket", daemon.socketPath], asNobody: true)
        XCTAssertEqual(seen.status, 0, seen.stderr)
        let report = try StatusReport.decode(Array(seen.stdout.utf8))
        XCTAssertEqual(report.segments.map(\.name), ["public"], "a segment nobody may not read is not in its report")
        XCTAssertFalse(seen.stdout.contains("private"), seen.stdout)
        XCTAssertFalse(report.clients.isEmpty, "nobody sees its own connection")
        XCTAssertTrue(report.clients.allSatisfy { $0.uid == 65534 }, "only its own uid's clients: \(report.clients)")

        // Root (and the daemon's user) still see everything.
        let full = try await root.status()
        XCTAssertEqual(full.segments.map(\.name), ["private", "public"])
        XCTAssertEqual(full.segments.first?.version, 1)
        XCTAssertTrue(full.clients.contains { $0.uid == 0 && $0.opened == ["private"] })
    }

    func testOneUserCannotTakeEveryClientSlotAndRootKeepsAReserve() async throws {
        try requireRoot()
        let daemon = try TestDaemon(segments: [segment("s", size: 64)],
                                    limits: ["maxClients": 8, "maxClientsPerUser": 3, "reservedClients": 2])
        defer { daemon.stop() }
        let script = daemon.directory + "/hold.py"
        try Self.holdScript.write(toFile: script, atomically: true, encoding: .utf8)
        let stop = daemon.directory + "/stop"
        var holders: [ChildProcess] = []
        // Whatever happens, the holders are told to leave (they poll for the stop file).
        defer {
            _ = FileManager.default.createFile(atPath: stop, contents: nil)
            for child in holders { _ = child.finish(timeout: 30) }
        }

        // Each holder connects `count` times, reports which connections were refused at once,
        // and keeps the accepted ones open until the stop file appears.
        func hold(uid: Int, count: Int) throws -> ChildProcess {
            let child = try ChildProcess("/usr/bin/setpriv", ["--reuid=\(uid)", "--regid=\(uid)", "--clear-groups",
                                                              "/usr/bin/python3", script, daemon.socketPath, "\(count)", stop])
            holders.append(child)
            XCTAssertTrue(child.waitForStderr("held"), child.stderrText)
            return child
        }
        let nobody = try hold(uid: 65534, count: 6)
        XCTAssertTrue(nobody.stderrText.contains("held 3 refused 3"), nobody.stderrText)
        let other = try hold(uid: 12345, count: 4)
        XCTAssertTrue(other.stderrText.contains("held 3 refused 1"), other.stderrText)
        let third = try hold(uid: 12346, count: 1)
        XCTAssertTrue(third.stderrText.contains("held 0 refused 1"), "the unprivileged share (8 - 2 reserved) is used up: \(third.stderrText)")

        // Root still gets in, into the reserve, and is told nothing about the others' segments it may not see.
        let root = try await daemon.connect()
        let status = try await root.status()
        XCTAssertEqual(status.clients.filter { $0.uid == 65534 }.count, 3)
        XCTAssertEqual(status.clients.filter { $0.uid == 12345 }.count, 3)
        XCTAssertGreaterThanOrEqual(status.counters.clientsRefused, 5)

        _ = FileManager.default.createFile(atPath: stop, contents: nil)
        for child in [nobody, other, third] { _ = child.finish(timeout: 30) }
        // Slots come back when their holders leave.
        let again = try hold(uid: 65534, count: 3)
        XCTAssertTrue(again.stderrText.contains("held 3 refused 0"), again.stderrText)
        _ = again.finish(timeout: 30)
    }

    func testAtTheDescriptorLimitTheDaemonNeitherSpinsNorBlamesTheClient() throws {
        let daemon = try TestDaemon(segments: [segment("s", size: 4096)], launcher: ["/usr/bin/prlimit", "--nofile=90:90", "--"])
        defer { daemon.stop() }
        let early = try RawConnection(socketPath: daemon.socketPath)
        try early.hello()

        // Far more connections than descriptors: the daemon runs out, and the rest wait in the backlog.
        var flood: [FileDescriptor] = []
        for _ in 0..<140 { flood.append(try SeqpacketSocket.connect(path: daemon.socketPath)) }
        defer { flood.forEach { $0.closeQuietly() } }
        usleep(300_000)

        // A request carrying a descriptor the daemon cannot take names the daemon's limit.
        let payload = try MemoryFile.create(name: "payload", size: 4)
        let reply = try early.request(.publish(segment: "s", payload: .attachedFile(length: 4)), descriptors: [payload])
        payload.closeQuietly()
        XCTAssertEqual(errorCode(reply), .descriptorLimit, "\(reply)")
        if case .error(let error) = reply { XCTAssertTrue(error.message.contains("RLIMIT_NOFILE"), error.message) }

        // No busy loop: the daemon's CPU time stays flat while connections stay queued.
        let before = try Self.cpuSeconds(of: daemon.pid)
        sleep(2)
        let used = try Self.cpuSeconds(of: daemon.pid) - before
        XCTAssertLessThan(used, 0.5, "the daemon used \(used) s of CPU in 2 s at its descriptor limit")
        let logLines = daemon.child.stderrText.components(separatedBy: "\n").filter { $0.contains("cannot accept connections") }
        XCTAssertLessThanOrEqual(logLines.count, 2, "rate-limited: \(logLines.count) lines")
        XCTAssertGreaterThanOrEqual(logLines.count, 1, "the exhaustion is logged")

        // Once descriptors free up, the queued connections are served.
        for fd in flood.prefix(100) { fd.closeQuietly() }
        let queued = flood.suffix(20)
        flood = Array(flood.dropFirst(100).dropLast(20))
        var served = 0
        for fd in queued {
            let hello = Request.hello(protocolVersion: ControlProtocol.version, clientName: "queued").encode(requestID: 1)
            _ = try hello.withUnsafeBytes { try SeqpacketSocket.send(fd, $0) }
            var poller = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 10_000) == 1 { served += 1 }
            fd.closeQuietly()
        }
        XCTAssertEqual(served, 20, "every queued connection was answered once descriptors freed")
        let status = try early.request(.status)
        guard case .statusReport(let json) = status else { return XCTFail("\(status)") }
        XCTAssertEqual(try StatusReport.decode(json).counters.descriptorLimitRefusals, 1)
    }

    /// User plus system CPU time of a process, from /proc.
    static func cpuSeconds(of pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.range(of: ")")!.upperBound...].split(separator: " ")
        // After the command: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
        let ticks = Double(fields[11])! + Double(fields[12])!
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Connects N times; a connection refused by the daemon gets an ERROR at once, an accepted
    /// one hears nothing until it speaks. Holds the accepted ones until the stop file exists.
    static let holdScript = """
    import os, select, socket, sys, time
    path, count, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    held, refused = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        if select.select([s], [], [], 0.5)[0]:
            refused += 1
            s.close()
        else:
            held.append(s)
    print(f"held {len(held)} refused {refused}", file=sys.stderr, flush=True)
    while not os.path.exists(stop):
        time.sleep(0.05)
    """
}
