import Foundation
import Glibc
import XCTest

/// What operators see: `watch` accounts for every version it did not show.
final class OperatorTests: XCTestCase {
    func testWatchSaysHowManyVersionsItSkipped() throws {
        let daemon = try TestDaemon(segments: [segment("feed", size: 256, publishers: ["*"])])
        defer { daemon.stop() }
        let watch = try ChildProcess(Binaries.ctl, ["watch", "feed", "--json", "--socket", daemon.socketPath])
        defer { if watch.process.isRunning { watch.signal(SIGKILL) } }
        usleep(300_000)
        let lines = (1...2000).map { "line \($0)" }.joined(separator: "\n") + "\n"
        let publish = try runToCompletion(Binaries.ctl, ["publish", "feed", "--lines", "--socket", daemon.socketPath],
                                          stdin: Data(lines.utf8))
        XCTAssertEqual(publish.status, 0, publish.stderr)
        // Wait for the event of the last version, then stop the watcher.
        let deadline = Date().addingTimeInterval(30)
        var events: [[String: Any]] = []
        while Date() < deadline {
            usleep(100_000)
            let text = (try? String(contentsOfFile: watch.stdoutPath, encoding: .utf8)) ?? ""
            events = text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            if events.last?["version"] as? Int == 2000 { break }
        }
        watch.signal(SIGTERM)
        _ = watch.finish(timeout: 10)
        XCTAssertEqual(events.last?["version"] as? Int, 2000, "the watcher saw the last version")
        let shown = events.count
        let skipped = events.compactMap { $0["skipped"] as? Int }.reduce(0, +)
        XCTAssertEqual(shown + skipped, 2000, "every version is either shown or counted as skipped (\(shown) shown, \(skipped) skipped)")
    }

    func testShellCompletionsAreGeneratedForBashZshAndFish() throws {
        for shell in ["bash", "zsh", "fish"] {
            let script = try runToCompletion(Binaries.ctl, ["--generate-completion-script", shell])
            XCTAssertEqual(script.status, 0, script.stderr)
            for word in ["status", "watch", "publish", "socket"] {
                XCTAssertTrue(script.stdout.contains(word), "\(shell) completion lacks \(word)")
            }
            let daemon = try runToCompletion(Binaries.daemon, ["--generate-completion-script", shell])
            XCTAssertTrue(daemon.stdout.contains("check-config"), "\(shell): \(daemon.stdout.prefix(200))")
        }
        let file = NSTemporaryDirectory() + "shmbrokerctl-completion-\(getpid()).bash"
        try runToCompletion(Binaries.ctl, ["--generate-completion-script", "bash"]).stdout.write(toFile: file, atomically: true, encoding: .utf8)
        defer { unlink(file) }
        XCTAssertEqual(try runToCompletion("/bin/bash", ["-n", file]).status, 0, "the bash completion parses")
    }

    /// Under systemd, stderr is the journal: entries carry SEGMENT=, CLIENT_PID=, CLIENT_UID=,
    /// ERROR_CODE= fields, so `journalctl -u shmbroker SEGMENT=NAME` selects a segment's entries.
    func testJournalEntriesCarryStructuredFields() throws {
        let sandbox = try SystemdSandbox(segments: [segment("open", size: 64), segment("secret", size: 64, readers: [0])])
        defer { sandbox.powerOff() }
        XCTAssertEqual(try sandbox.systemctl("start", "shmbroker.socket", "shmbroker.service").status, 0)
        let refused = try sandbox.inside(sandbox.ctlCommand(["read", "secret"]), asNobody: true)
        XCTAssertTrue(refused.stderr.contains("no-such-segment"), refused.stderr)  // hidden names look absent
        var entries: [[String: Any]] = []
        let deadline = Date().addingTimeInterval(20)
        while entries.isEmpty && Date() < deadline {
            let query = try sandbox.inside(["/usr/bin/journalctl", "-u", "shmbroker", "SEGMENT=secret", "-o", "json", "--no-pager"])
            entries = query.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            if entries.isEmpty { usleep(200_000) }
        }
        let denied = try XCTUnwrap(entries.first { ($0["MESSAGE"] as? String)?.hasPrefix("access denied") == true }, "\(entries)")
        XCTAssertEqual(denied["CLIENT_UID"] as? String, "65534")
        XCTAssertEqual(denied["ERROR_CODE"] as? String, "no-such-segment", "the code the client was answered")
        XCTAssertEqual(denied["PRIORITY"] as? String, "5")
        XCTAssertNotNil(denied["CLIENT_PID"] as? String)
        let other = try sandbox.inside(["/usr/bin/journalctl", "-u", "shmbroker", "SEGMENT=open", "--no-pager", "-o", "cat"])
        XCTAssertFalse(other.stdout.contains("access denied"), other.stdout)
    }

    /// `shmbrokerctl metrics` and the textfile give the numbers of what the test did, and hide the
    /// series of a segment from users its readers list does not admit (the world-readable
    /// textfile included: see HostileFilesTests for a private one).
    func testMetricsOverTheSocketAndInTheTextfileCountWhatHappened() async throws {
        let base = "/tmp/shmbroker-metrics-\(getpid())-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: base) }
        let textfile = base + "/shmbroker.prom"
        let daemon = try TestDaemon(segments: [segment("a", size: 64, publishers: ["*"]), segment("secret", size: 64, readers: [0])],
                                    extraConfig: ["metrics": ["textfile": textfile, "intervalSeconds": 1]])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        for index in 0..<3 { try await client.publish("a", bytes: Array("value \(index)".utf8)) }   // 7 bytes each
        try await client.publish("secret", bytes: [1, 2])
        _ = try? await client.open("nope")  // one no-such-segment reply
        let publisher = try await client.openPublisher("a")
        try publisher.publish([9])
        _ = try publisher.flush()
        await publisher.close()

        func value(_ text: String, _ series: String) -> Double? {
            text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
        }
        let scraped = try runToCompletion(Binaries.ctl, ["metrics", "--socket", daemon.socketPath])
        XCTAssertEqual(scraped.status, 0, scraped.stderr)
        let text = scraped.stdout
        XCTAssertEqual(value(text, #"shmbroker_segment_publishes_total{segment="a"}"#), 4, text)
        XCTAssertEqual(value(text, #"shmbroker_segment_published_bytes_total{segment="a"}"#), 22, text)
        XCTAssertEqual(value(text, #"shmbroker_segment_version{segment="a"}"#), 4, text)
        XCTAssertEqual(value(text, #"shmbroker_segment_publishes_total{segment="secret"}"#), 1, text)
        XCTAssertEqual(value(text, #"shmbroker_error_replies_total{code="no-such-segment"}"#), 1, text)
        XCTAssertEqual(value(text, "shmbroker_rings_attached_total"), 1, text)
        XCTAssertEqual(value(text, #"shmbroker_rings_detached_total{reason="producer"}"#), 1, text)
        XCTAssertGreaterThanOrEqual(value(text, "shmbroker_clients") ?? 0, 1, text)
        XCTAssertGreaterThan(value(text, "shmbroker_event_loop_iterations_total") ?? 0, 5, text)
        XCTAssertNotNil(value(text, "shmbroker_event_loop_longest_turn_seconds"), text)
        XCTAssertTrue(text.contains("# TYPE shmbroker_segment_publishes_total counter"), text)

        if getuid() == 0 {
            let other = try runToCompletion(Binaries.ctl, ["metrics", "--socket", daemon.socketPath], asNobody: true)
            XCTAssertEqual(other.status, 0, other.stderr)
            XCTAssertEqual(value(other.stdout, #"shmbroker_segment_publishes_total{segment="a"}"#), 4)
            XCTAssertFalse(other.stdout.contains(#"segment="secret""#), "a segment nobody may not read: \(other.stdout)")
        }

        // The textfile for node_exporter, rewritten every second.
        let deadline = Date().addingTimeInterval(20)
        var file = ""
        while Date() < deadline {
            file = (try? String(contentsOfFile: textfile, encoding: .utf8)) ?? ""
            if value(file, #"shmbroker_segment_publishes_total{segment="a"}"#) == 4 { break }
            usleep(200_000)
        }
        XCTAssertEqual(value(file, #"shmbroker_segment_publishes_total{segment="a"}"#), 4, file)
        XCTAssertFalse(file.contains(#"segment="secret""#), "a world-readable textfile has only what everyone may see")
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: base).contains { $0.hasSuffix(".tmp") })
        client.close()
    }

    /// `top` in a real terminal (tmux): redrawn in place, with rates; and as lines without one.
    func testTopShowsRatesInATerminalAndLinesInAPipe() async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/tmux") else { throw XCTSkip("needs tmux (apt-get install tmux)") }
        let daemon = try TestDaemon(segments: [segment("busy", size: 64, publishers: ["*"]), segment("quiet", size: 64)])
        defer { daemon.stop() }
        let session = "shmbroker-top-\(getpid())"
        // A server of our own (-L), never a user's; started by this call, stopped at the end.
        let tmux = ["-L", session]
        let started = try runDetaching("/usr/bin/tmux", tmux + ["new-session", "-d", "-s", session, "-x", "140", "-y", "40",
                                                           "\(Binaries.ctl) top --interval 0.5 --socket \(daemon.socketPath)"])
        XCTAssertEqual(started.status, 0, started.stderr)
        // (kill-server alone leaves the server waiting for `top`, which it does not hang up here.)
        let panePID = Int32(try runDetaching("/usr/bin/tmux", tmux + ["display-message", "-p", "-t", session, "#{pane_pid}"])
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        defer {
            if panePID > 0 { kill(panePID, SIGTERM) }
            _ = try? runDetaching("/usr/bin/tmux", tmux + ["kill-server"])
        }
        let client = try await daemon.connect()
        let publisher = try await client.openPublisher("busy")
        var screen = ""
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            for _ in 0..<200 { try publisher.publish([1, 2, 3, 4]) }
            _ = try publisher.flush()
            usleep(100_000)
            screen = try runDetaching("/usr/bin/tmux", tmux + ["capture-pane", "-p", "-t", session]).stdout
            let busy = screen.split(separator: "\n").first { $0.hasPrefix("busy ") } ?? ""
            let rate = busy.split(separator: " ", omittingEmptySubsequences: true).dropFirst(2).first.flatMap { Double($0) } ?? 0
            if rate > 0 { break }
        }
        await publisher.close()
        XCTAssertTrue(screen.contains("SEGMENT") && screen.contains("PUBLISHES/S") && screen.contains("quiet"), screen)
        let busy = screen.split(separator: "\n").first { $0.hasPrefix("busy ") } ?? ""
        XCTAssertGreaterThan(busy.split(separator: " ", omittingEmptySubsequences: true).dropFirst(2).first.flatMap { Double($0) } ?? 0, 0,
                             "a publish rate is shown: \(screen)")
        XCTAssertEqual(screen.components(separatedBy: "PUBLISHES/S").count - 1, 1, "redrawn in place, not scrolled: \(screen)")

        let lines = try runToCompletion(Binaries.ctl, ["top", "--count", "2", "--interval", "0.2", "--socket", daemon.socketPath])
        XCTAssertEqual(lines.status, 0, lines.stderr)
        XCTAssertFalse(lines.stdout.contains("\u{1B}["), "no terminal escapes in a pipe")
        XCTAssertEqual(lines.stdout.components(separatedBy: "PUBLISHES/S").count - 1, 2, lines.stdout)
        client.close()
    }
}
