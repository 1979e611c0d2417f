import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerProtocol
import XCTest

/// The example owner, `shmbroker-sysload`, as real processes: an application that owns its
/// segment and publishes in-process, with readers in other processes (and of another uid) on its
/// control socket — standalone with a NOTIFY_SOCKET listener, and under a real systemd as a
/// Type=notify service that survives kill -9 with no data lost.
final class OwnerProcessTests: XCTestCase {
    func testTheExampleOwnerSpeaksSdNotifyServesReadersAndRefusesClientPublishers() async throws {
        let directory = "/tmp/shmbroker-sysload-test-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socketPath = directory + "/control.sock"
        let configPath = directory + "/sysload.json"
        try TestDaemon.writeConfig(at: configPath, socketPath: socketPath,
                                   segments: [segment("sysload", size: "4KiB", readers: ["*"], publishers: ["*"])])
        let notify = try NotifyListener(directory: directory)
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notify.path
        let owner = try ChildProcess(Binaries.path("shmbroker-sysload"), ["--config", configPath, "--interval-ms", "50"],
                                     environment: environment)
        defer { if owner.process.isRunning { owner.signal(SIGKILL) } }
        let ready = try XCTUnwrap(notify.waitFor("READY=1"), owner.stderrText)
        XCTAssertTrue(ready.contains("STATUS=serving 1 segment"), ready)

        let read = try runToCompletion(Binaries.ctl, ["read", "sysload", "--socket", socketPath])
        XCTAssertEqual(read.status, 0, read.stderr)
        XCTAssertTrue(read.stdout.contains("\"loadavg\""), read.stdout)
        if getuid() == 0 {
            let other = try runToCompletion(Binaries.ctl, ["read", "sysload", "--socket", socketPath], asNobody: true)
            XCTAssertEqual(other.status, 0, other.stderr)
            XCTAssertTrue(other.stdout.contains("\"sequence\""), other.stdout)
        }
        // One writer: even a peer the publishers list admits is refused, with the reason.
        let publish = try runToCompletion(Binaries.ctl, ["publish", "sysload", "-", "--socket", socketPath], stdin: Data("x".utf8))
        XCTAssertNotEqual(publish.status, 0)
        XCTAssertTrue(publish.stderr.contains("owner-publishes"), publish.stderr)
        let ring = try runToCompletion(Binaries.testKit, ["ring-producer", "--socket", socketPath, "--segment", "sysload", "--count", "3"])
        XCTAssertNotEqual(ring.status, 0)
        XCTAssertTrue((ring.stderr + ring.stdout).contains("owner-publishes"), ring.stderr + ring.stdout)

        // Subscribers get VERSION events sent by the owner's event loop.
        let watch = try runToCompletion(Binaries.ctl, ["watch", "sysload", "--count", "3", "--socket", socketPath], timeout: 60)
        XCTAssertEqual(watch.status, 0, watch.stderr)
        XCTAssertEqual(watch.stdout.split(separator: "\n").count, 3, watch.stdout)
        // A reader blocked on the futex word is woken by the owner's publishing thread.
        let waiter = try runToCompletion(Binaries.testKit, ["wait-version", "--socket", socketPath, "--segment", "sysload", "--timeout", "30"])
        XCTAssertEqual(waiter.status, 0, waiter.stderr)
        let waited = try waiter.json()
        XCTAssertGreaterThan(waited["after"] as? Int ?? 0, waited["before"] as? Int ?? .max)

        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "owner-process-test")
        let status = try await client.status()
        XCTAssertGreaterThanOrEqual(status.counters.publishes, 3)
        XCTAssertEqual(status.segments.first?.name, "sysload")
        // The owner says who it is (item 25), and outside systemd its writable segment memory
        // goes to no one listening on NOTIFY_SOCKET (item 18).
        XCTAssertEqual(status.daemon.name, "shmbroker-sysload")
        XCTAssertEqual(status.daemon.version, ShmBrokerVersion.string)
        XCTAssertEqual(client.daemonVersion, "shmbroker-sysload \(ShmBrokerVersion.string)")
        while notify.next(timeout: 0.2) != nil {}
        XCTAssertFalse(notify.received.contains { $0.contains("FDSTORE") }, "\(notify.received)")
        client.close()

        owner.signal(SIGTERM)
        XCTAssertNotNil(notify.waitFor("STOPPING=1"), "STOPPING=1 on SIGTERM")
        let result = owner.finish(timeout: 30)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: socketPath), "the socket is removed on stop")
    }

    /// A config for the example owner with one 4 KiB segment, in a directory removed after the test.
    func sysloadConfig(_ tag: String) throws -> (socketPath: String, configPath: String) {
        let directory = "/tmp/shmbroker-sysload-\(tag)-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        addTeardownBlock { try? FileManager.default.removeItem(atPath: directory) }
        let configPath = directory + "/sysload.json"
        try TestDaemon.writeConfig(at: configPath, socketPath: directory + "/control.sock", segments: [segment("sysload", size: "4KiB")])
        return (directory + "/control.sock", configPath)
    }

    /// Issue 17, item 21: a subscriber of an owner-published segment never gets a first VERSION
    /// event that repeats the version SUBSCRIBED reported, however its subscription races the
    /// owner's publishes and the loop's timer (which announces an owner's version nobody was
    /// subscribed to when it was published). 15 subscriptions, publishes every 200 ms.
    func testNoEventRepeatsTheVersionSubscribedReported() throws {
        let (socketPath, configPath) = try sysloadConfig("events")
        let owner = try ChildProcess(Binaries.path("shmbroker-sysload"), ["--config", configPath, "--interval-ms", "200"])
        defer {
            owner.signal(SIGTERM)
            _ = owner.finish(timeout: 30)
        }
        let deadline = Date().addingTimeInterval(30)
        var connection: RawConnection?
        while connection == nil && Date() < deadline {
            connection = try? RawConnection(socketPath: socketPath)
            if connection == nil { usleep(20_000) }
        }
        let raw = try XCTUnwrap(connection, owner.stderrText)
        try raw.hello()
        var repeated: [UInt64] = []
        for _ in 0..<15 {
            guard case .subscribed(let latest) = try raw.request(.subscribe(segment: "sysload")) else { return XCTFail("SUBSCRIBE") }
            var first: UInt64?
            while first == nil {
                guard let (_, message, _) = try raw.receive() else { return XCTFail("the owner closed the connection") }
                if case .versionEvent(_, let info) = message { first = info.version }
            }
            if let first, first <= latest.version { repeated.append(first) }
            guard case .ok = try raw.request(.unsubscribe(segment: "sysload")) else { return XCTFail("UNSUBSCRIBE") }
            usleep(UInt32.random(in: 150_000...350_000))  // a publish nobody is subscribed to happens meanwhile
        }
        XCTAssertEqual(repeated, [], "first events at or before the version SUBSCRIBED reported")
    }

    /// Issue 17, item 23: SIGTERM while the example owner publishes flat out ends it cleanly
    /// (exit 0, no error) every time; its loop is `ShmBrokerOwner.run(every:_:)`.
    func testSIGTERMWhilePublishingFlatOutEndsTheOwnerCleanly() throws {
        let (socketPath, configPath) = try sysloadConfig("stop")
        for round in 0..<10 {
            let owner = try ChildProcess(Binaries.path("shmbroker-sysload"), ["--config", configPath, "--interval-ms", "0"])
            let deadline = Date().addingTimeInterval(30)
            while !FileManager.default.fileExists(atPath: socketPath) && Date() < deadline { usleep(5_000) }
            usleep(UInt32.random(in: 1_000...50_000))
            owner.signal(SIGTERM)
            let exit = owner.finish(timeout: 30)
            XCTAssertEqual(exit.status, 0, "round \(round): \(exit.stderr.suffix(600))")
            XCTAssertFalse(exit.stderr.contains("segment-retired"), "round \(round): \(exit.stderr.suffix(600))")
        }
    }

    func testTheExampleOwnerUnderSystemdSurvivesKill9WithNoDataLost() throws {
        let sandbox = try SystemdSandbox(segments: [segment("sysload", size: "4KiB")], unit: "shmbroker-sysload",
                                         executable: "shmbroker-sysload", arguments: "--interval-ms 3600000")
        defer { sandbox.powerOff() }
        do {
            XCTAssertEqual(try sandbox.systemctl("start", "shmbroker-sysload.socket").status, 0)
            let start = try sandbox.systemctl("start", "shmbroker-sysload.service")
            XCTAssertEqual(start.status, 0, start.stderr)
            XCTAssertEqual(try sandbox.property("ActiveState"), "active")
            let statusText = try sandbox.property("StatusText")
            XCTAssertTrue(statusText.hasPrefix("serving 1 segment"), statusText)
            let user = try sandbox.inside(["/bin/ps", "-o", "user=", "-p", "\(try sandbox.mainPID())"]).stdout
            XCTAssertEqual(user.trimmingCharacters(in: .whitespacesAndNewlines), "shmbroker", "runs as its own user in the hardened unit")

            let first = try sandbox.inside(sandbox.ctlCommand(["read", "sysload"]), asNobody: true)
            XCTAssertEqual(first.status, 0, first.stderr)
            XCTAssertTrue(first.stdout.contains("\"sequence\":1,"), first.stdout)
            let refused = try sandbox.inside(sandbox.ctlCommand(["publish", "sysload", "-"]), stdin: Data("x".utf8))
            XCTAssertTrue(refused.stderr.contains("owner-publishes"), refused.stderr)

            // A reader of another uid maps the segment and sleeps on its futex across the kills.
            let waiter = try sandbox.spawnInside(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                                  sandbox.testKit, "wait-version", "--socket", sandbox.socketPath,
                                                  "--segment", "sysload", "--timeout", "90"])
            XCTAssertTrue(waiter.waitForStderr("waiting after 1"), waiter.stderrText)
            var pid = try sandbox.mainPID()
            for round in 2...4 {
                XCTAssertEqual(kill(try sandbox.hostPID(pid), SIGKILL), 0)
                pid = try sandbox.waitForNewMainPID(other: pid)
                // The new process took the segment back from the fd store and carried on.
                var content = ""
                let deadline = Date().addingTimeInterval(30)
                while !content.contains("\"sequence\":\(round),") && Date() < deadline {
                    content = try sandbox.inside(sandbox.ctlCommand(["read", "sysload"])).stdout
                    usleep(50_000)
                }
                XCTAssertTrue(content.contains("\"sequence\":\(round),"), "after kill \(round - 1): \(content)")
            }
            let woken = waiter.finish(timeout: 60)
            XCTAssertEqual(woken.status, 0, woken.stderr)
            let outcome = try woken.json()
            XCTAssertEqual(outcome["before"] as? Int, 1)
            XCTAssertGreaterThanOrEqual(outcome["after"] as? Int ?? 0, 2, "the sleeping reader was woken by a restarted owner")
            let verbose = try sandbox.inside(sandbox.ctlCommand(["read", "sysload", "--verbose"]))
            XCTAssertTrue(verbose.stderr.contains("version 4"), "versions continued across three kill -9s: \(verbose.stderr)")
            let journal = try sandbox.journal()
            XCTAssertEqual(journal.components(separatedBy: "segment restored from the fd store").count - 1, 3, journal)

            XCTAssertEqual(try sandbox.systemctl("stop", "shmbroker-sysload.service").status, 0)
            XCTAssertEqual(try sandbox.property("ActiveState"), "inactive")
            XCTAssertEqual(try sandbox.property("Result"), "success", "a clean stop after STOPPING=1")
        } catch {
            XCTFail("journal:\n\((try? sandbox.journal()) ?? "")")
            throw error
        }
    }
}
