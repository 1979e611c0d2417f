import Foundation
@testable import ShmBrokerMirror
import XCTest

/// Staleness, driven by explicit times: silence, lag, an unavailable source, late heartbeats and
/// catching up after a stale spell.
final class FreshnessTests: XCTestCase {
    let second: UInt64 = 1_000_000_000
    /// Local monotonic time and wall time move together in these tests.
    let wallOrigin = Date(timeIntervalSince1970: 1_800_000_000)

    func wall(_ now: UInt64) -> Date { wallOrigin.addingTimeInterval(Double(now) / 1e9) }
    /// A heartbeat sent at local time `sent` (same clock as the source here).
    func sentAt(_ sent: UInt64) -> UInt64 { UInt64(wall(sent).timeIntervalSince1970 * 1e9) }

    func beat(_ freshness: inout Freshness, sent: UInt64, at now: UInt64, version: UInt64, epoch: UInt64 = 1, available: Bool = true) {
        freshness.heartbeat(sentAt: sentAt(sent), .init(epoch: epoch, version: version, available: available), now: now, wall: wall(now))
    }

    func testSilenceTurnsItStaleAndATimelyHeartbeatFreshAgain() {
        var freshness = Freshness(staleAfterSeconds: 1, clockToleranceSeconds: 0.25, now: 0)
        XCTAssertFalse(freshness.evaluate(now: second / 2, wall: wall(second / 2)))
        XCTAssertTrue(freshness.evaluate(now: 2 * second, wall: wall(2 * second)), "no heartbeat for a second after listening")
        XCTAssertTrue(freshness.isStale)
        XCTAssertEqual(freshness.reason, "no heartbeat yet")
        beat(&freshness, sent: 2 * second, at: 2 * second, version: 0)
        XCTAssertTrue(freshness.evaluate(now: 2 * second, wall: wall(2 * second)))
        XCTAssertFalse(freshness.isStale)
        XCTAssertTrue(freshness.evaluate(now: 4 * second, wall: wall(4 * second)))
        XCTAssertEqual(freshness.reason?.hasPrefix("no heartbeat for 2.00 s"), true, freshness.reason ?? "")
    }

    func testALateHeartbeatNeverMakesItFresh() {
        var freshness = Freshness(staleAfterSeconds: 1, clockToleranceSeconds: 0.25, now: 0)
        beat(&freshness, sent: 0, at: 0, version: 3)
        freshness.local(version: 3, epoch: 1, now: 0, wall: wall(0))
        freshness.evaluate(now: 5 * second, wall: wall(5 * second))
        XCTAssertTrue(freshness.isStale)
        // Queued during a partition: sent at 2 s, arriving at 5 s.
        beat(&freshness, sent: 2 * second, at: 5 * second, version: 4)
        freshness.evaluate(now: 5 * second, wall: wall(5 * second))
        XCTAssertTrue(freshness.isStale, "a heartbeat that left 3 s ago says nothing about now")
        XCTAssertEqual(freshness.sourceVersion, 4, "but the source's version it carried counts")
        // An older one still, arriving after a newer one: ignored altogether.
        XCTAssertFalse(freshness.heartbeat(sentAt: sentAt(second), .init(epoch: 1, version: 9, available: true), now: 5 * second, wall: wall(5 * second)))
        XCTAssertEqual(freshness.sourceVersion, 4, "highest seen wins; an out-of-order heartbeat is dropped")
    }

    func testLaggingBehindTheSourceTurnsItStaleAndOnlyCatchingUpTurnsItFresh() {
        var freshness = Freshness(staleAfterSeconds: 1, clockToleranceSeconds: 0.25, now: 0)
        freshness.local(version: 10, epoch: 1, now: 0, wall: wall(0))
        for tick in 0...8 {
            let now = UInt64(tick) * second / 4
            beat(&freshness, sent: now, at: now, version: 20)  // timely, but ahead of us
            freshness.evaluate(now: now, wall: wall(now))
        }
        XCTAssertTrue(freshness.isStale, "heartbeats arrive, but the local segment stays behind")
        XCTAssertEqual(freshness.reason?.hasPrefix("behind the source"), true, freshness.reason ?? "")
        freshness.local(version: 15, epoch: 1, now: 2 * second, wall: wall(2 * second))
        beat(&freshness, sent: 2 * second, at: 2 * second, version: 20)
        freshness.evaluate(now: 2 * second, wall: wall(2 * second))
        XCTAssertTrue(freshness.isStale, "still catching up")
        freshness.local(version: 20, epoch: 1, now: 2 * second + 1, wall: wall(2 * second + 1))
        freshness.evaluate(now: 2 * second + 1, wall: wall(2 * second + 1))
        XCTAssertFalse(freshness.isStale, "caught up with the announced version")
    }

    func testAnUnavailableSourceOrANewEpochCounts() {
        var freshness = Freshness(staleAfterSeconds: 1, clockToleranceSeconds: 0.25, now: 0)
        beat(&freshness, sent: 0, at: 0, version: 5, available: false)
        freshness.evaluate(now: 0, wall: wall(0))
        XCTAssertTrue(freshness.isStale, "the exporter says it cannot reach the segment's owner")
        freshness.local(version: 9, epoch: 1, now: 0, wall: wall(0))
        beat(&freshness, sent: second, at: second, version: 2, epoch: 2)
        XCTAssertEqual(freshness.sourceVersion, 2, "a new epoch starts the source's versions over")
        XCTAssertNotNil(freshness.behindSince, "the local segment still holds the old epoch")
    }

    func testASourceWithNothingPublishedIsNotBehind() {
        var freshness = Freshness(staleAfterSeconds: 1, clockToleranceSeconds: 0.25, now: 0)
        for tick in 0...12 {
            let now = UInt64(tick) * second / 4
            beat(&freshness, sent: now, at: now, version: 0)
            freshness.evaluate(now: now, wall: wall(now))
        }
        XCTAssertFalse(freshness.isStale)
    }
}
