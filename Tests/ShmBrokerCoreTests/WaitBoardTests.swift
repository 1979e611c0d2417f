import Atomics
import Foundation
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage
import XCTest

/// The wait board (layout 2): a publish wakes futex sleepers only while the board counts one, so
/// a publish nobody sleeps on makes no system call; registered readers are still woken; the
/// backstop wakes a sleeper whose count was erased. Checked with real memfds, mappings and
/// futex waits in threads: what a waiter observes (woken or timed out), not timings.
final class WaitBoardTests: XCTestCase {
    struct Mapped {
        let writer: SegmentWriter
        let reader: SegmentReader
        let board: MappedRegion
        let files: [FileDescriptor]
        var sleepers: UnsafeAtomic<UInt32> {
            UnsafeAtomic(at: (board.base + SegmentLayout.WaitBoard.sleepers).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
        }
        var futexWord: UnsafePointer<UInt32> {
            UnsafePointer(writer.region.base.advanced(by: SegmentLayout.Header.futexWord).assumingMemoryBound(to: UInt32.self))
        }
    }

    func makeSegment() throws -> Mapped {
        let layout = SegmentLayout(capacity: 64, slotCount: 3)
        let file = try MemoryFile.create(name: "board-test", size: layout.totalSize)
        let boardFile = try MemoryFile.create(name: "board", size: SegmentLayout.WaitBoard.size, mode: 0o600)
        let board = try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true)
        let writer = SegmentWriter(formatting: try MappedRegion(mapping: file, length: layout.totalSize, writable: true),
                                   layout: layout, name: "board", board: board)
        let readOnly = try MemoryFile.readOnlyDuplicate(of: file)
        defer { readOnly.closeQuietly() }
        // The reader maps the board through its own descriptor, as a client does.
        let readerBoard = try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true)
        let reader = try SegmentReader(region: try MappedRegion(mapping: readOnly, length: layout.totalSize, writable: false),
                                       board: readerBoard)
        return Mapped(writer: writer, reader: reader, board: board, files: [file, boardFile])
    }

    /// Sleeps on the futex word directly, without counting itself: what a reader that ignores
    /// the board would do. Returns how the wait ended.
    func rawWait(on segment: Mapped, timeoutNanoseconds: UInt64, whilePublishing publish: () -> Void) -> Futex.WaitResult? {
        let word = segment.futexWord.pointee
        let outcome = Outcome()
        let address = UInt(bitPattern: segment.futexWord)
        let thread = Thread {
            let pointer = UnsafePointer<UInt32>(bitPattern: address)!
            outcome.set(Futex.wait(on: pointer, whileEqualTo: word, timeoutNanoseconds: timeoutNanoseconds))
        }
        thread.start()
        usleep(150_000)  // let it reach FUTEX_WAIT
        publish()
        return outcome.wait()
    }

    func testTheHeaderSaysTheWriterUsesTheBoard() throws {
        let segment = try makeSegment()
        defer { segment.files.forEach { $0.closeQuietly() } }
        let flags = segment.writer.region.base.load(fromByteOffset: SegmentLayout.Header.flags, as: UInt32.self)
        XCTAssertEqual(flags & SegmentLayout.Flags.sleeperBoard, SegmentLayout.Flags.sleeperBoard)
        XCTAssertEqual(segment.writer.region.base.load(fromByteOffset: SegmentLayout.Header.layoutVersion, as: UInt32.self), 2)
    }

    func testAPublishNobodyIsCountedForWakesNobody() throws {
        let segment = try makeSegment()
        defer { segment.files.forEach { $0.closeQuietly() } }
        XCTAssertEqual(segment.sleepers.load(ordering: .relaxed), 0)
        let result = rawWait(on: segment, timeoutNanoseconds: 600_000_000) { _ = try? segment.writer.publish([1]) }
        XCTAssertEqual(result, .timedOut, "with no sleeper counted, the publish made no FUTEX_WAKE")
        XCTAssertEqual(segment.reader.latestVersion, 1)
    }

    func testACountedSleeperIsWokenAndTheBackstopWakesAnUncountedOne() throws {
        let segment = try makeSegment()
        defer { segment.files.forEach { $0.closeQuietly() } }
        segment.sleepers.store(1, ordering: .sequentiallyConsistent)
        let woken = rawWait(on: segment, timeoutNanoseconds: 20_000_000_000) { _ = try? segment.writer.publish([1]) }
        XCTAssertEqual(woken, .woken)
        segment.sleepers.store(0, ordering: .sequentiallyConsistent)
        let backstop = rawWait(on: segment, timeoutNanoseconds: 20_000_000_000) { segment.writer.wakeAllWaiters() }
        XCTAssertEqual(backstop, .woken, "wakeAllWaiters ignores the board")
    }

    func testAReaderCountsItselfWhileItSleepsAndIsWoken() throws {
        let segment = try makeSegment()
        defer { segment.files.forEach { $0.closeQuietly() } }
        let outcome = VersionOutcome()
        let reader = segment.reader
        let thread = Thread { outcome.set(reader.waitForVersion(after: 0, timeoutNanoseconds: 20_000_000_000)) }
        thread.start()
        let deadline = Date().addingTimeInterval(10)
        while segment.sleepers.load(ordering: .acquiring) == 0 && Date() < deadline { usleep(1000) }
        XCTAssertEqual(segment.sleepers.load(ordering: .acquiring), 1, "the sleeping reader counts itself")
        usleep(50_000)
        _ = try segment.writer.publish([7])
        XCTAssertEqual(outcome.wait(), 1)
        while segment.sleepers.load(ordering: .acquiring) != 0 && Date() < deadline { usleep(1000) }
        XCTAssertEqual(segment.sleepers.load(ordering: .acquiring), 0, "and uncounts itself when it returns")
    }

    func testSpinningAndBoundedSpinningReadersSeeTheNextVersion() throws {
        let segment = try makeSegment()
        defer { segment.files.forEach { $0.closeQuietly() } }
        let reader = segment.reader
        for (index, strategy) in [SegmentReader.WaitStrategy.spin, .spinThenFutex(nanoseconds: 1_000_000)].enumerated() {
            let outcome = VersionOutcome()
            let after = UInt64(index)
            let thread = Thread { outcome.set(reader.waitForVersion(after: after, timeoutNanoseconds: 20_000_000_000, strategy: strategy)) }
            thread.start()
            usleep(100_000)
            _ = try segment.writer.publish([UInt8(index)])
            XCTAssertEqual(outcome.wait(), after + 1, "\(strategy)")
        }
        // A spin with a timeout and no publish returns the old version once the time is up.
        XCTAssertEqual(segment.reader.waitForVersion(after: 2, timeoutNanoseconds: 20_000_000, strategy: .spin), 2)
    }
}

/// A value handed from a thread to the test, with a wait.
final class Outcome: @unchecked Sendable {
    private let condition = NSCondition()
    private var value: Futex.WaitResult?
    func set(_ result: Futex.WaitResult) { condition.lock(); value = result; condition.signal(); condition.unlock() }
    func wait() -> Futex.WaitResult? {
        condition.lock()
        defer { condition.unlock() }
        while value == nil { condition.wait() }
        return value
    }
}

final class VersionOutcome: @unchecked Sendable {
    private let condition = NSCondition()
    private var value: UInt64?
    func set(_ result: UInt64) { condition.lock(); value = result; condition.signal(); condition.unlock() }
    func wait() -> UInt64? {
        condition.lock()
        defer { condition.unlock() }
        while value == nil { condition.wait() }
        return value
    }
}
