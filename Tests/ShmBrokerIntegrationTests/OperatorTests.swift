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
}
