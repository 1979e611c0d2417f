import Foundation
import Glibc
@testable import ShmBroker
import ShmBrokerClient
import ShmBrokerProtocol
import XCTest

/// The embeddable owner, in this test process: it creates segments, serves real clients on a real
/// socket, and publishes in-process. Readers here are the real Swift client over that socket.
final class OwnerTests: XCTestCase {
    var directory = ""

    override func setUp() {
        directory = "/tmp/shmbroker-owner-test-\(getpid())-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    var socketPath: String { directory + "/control.sock" }

    func writeConfig(_ segments: String) throws -> String {
        let path = directory + "/owner.json"
        try Self.config(socketPath: socketPath, segments: segments).write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    static func config(socketPath: String, segments: String) -> String {
        """
        {"socket": {"path": "\(socketPath)", "mode": "0666"},
         "segments": [\(segments)]}
        """
    }

    func makeOwner() throws -> ShmBrokerOwner {
        let path = try writeConfig("""
            {"name": "owned", "size": 4096, "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}},
            {"name": "open", "size": 4096, "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}}
            """)
        return try ShmBrokerOwner(configPath: path, options: .init(handlesSignals: false, adoptsSystemdDescriptors: false))
    }

    func testInProcessPublishesReachReadersAndSubscribersAndClientsMayNotPublish() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("owned")
        XCTAssertTrue(owned === (try owner.segment("owned")), "one handle per segment")
        try owner.start()

        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "owner-test")
        let handle = try await client.open("owned")
        XCTAssertNil(try handle.read())
        var events = try await client.subscribe("owned").makeAsyncIterator()

        let receipt = try owned.publish(Array("first".utf8))
        XCTAssertEqual(receipt.version, 1)
        XCTAssertEqual(try handle.read()?.bytes, Array("first".utf8), "visible in the mapping as soon as publish returns")
        var announced: UInt64 = 0
        while announced < 1, let event = await events.next() {
            if case .version(let info) = event { announced = info.version }
        }
        XCTAssertEqual(announced, 1, "the event loop announced the in-process publish")

        // Zero-copy: the payload is built in the slot itself; a fill that throws publishes nothing.
        let zero = try owned.publish(length: 3) { slot in slot.copyBytes(from: [9, 8, 7]) }
        XCTAssertEqual(zero.version, 2)
        XCTAssertEqual(try handle.read()?.bytes, [9, 8, 7])
        struct Abandoned: Error {}
        XCTAssertThrowsError(try owned.publish(length: 2) { _ in throw Abandoned() }) { XCTAssertTrue($0 is Abandoned) }
        XCTAssertEqual(try handle.read()?.version, 2, "the abandoned version never became visible")
        XCTAssertThrowsError(try owned.publish([UInt8](repeating: 0, count: 4097))) { error in
            XCTAssertEqual((error as? OwnerError)?.code, "payload-too-large")
        }

        // One writer: clients may not publish to an owned segment, by request or by ring.
        do {
            try await client.publish("owned", bytes: [1])
            XCTFail("a client publish to an owned segment was accepted")
        } catch {
            XCTAssertTrue("\(error)".contains("owner-publishes"), "\(error)")
        }
        do {
            let ring = try await client.openPublisher("owned")
            await ring.close()
            XCTFail("a client ring on an owned segment was attached")
        } catch {
            XCTAssertTrue("\(error)".contains("owner-publishes"), "\(error)")
        }
        // ... but may publish to a segment the owner left to them.
        try await client.publish("open", bytes: [1])
        let status = try await client.status()
        XCTAssertEqual(status.segments.first { $0.name == "owned" }?.version, 2)
        XCTAssertEqual(status.counters.publishes, 3, "two owner publishes plus one client publish")
        XCTAssertEqual(owned.publishCount, 2)
        client.close()
    }

    func testAFutexWaitingReaderIsWokenByThePublishingThread() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("owned")
        try owner.start()
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "waiter")
        let handle = try await client.open("owned")
        let woke = expectation(description: "woken")
        let thread = Thread {
            if handle.waitForVersion(after: 0, timeoutNanoseconds: 20_000_000_000) == 1 { woke.fulfill() }
        }
        thread.start()
        usleep(100_000)
        try owned.publish([42])
        await fulfillment(of: [woke], timeout: 20)
        client.close()
    }

    func testOnePublishingThreadAtATimeIsEnforced() throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("owned")
        try owner.start()
        let inside = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let thread = Thread {
            _ = try? owned.publish(length: 1) { slot in
                slot[0] = 1
                inside.signal()
                release.wait()
            }
        }
        thread.start()
        inside.wait()
        XCTAssertThrowsError(try owned.publish([2])) { XCTAssertEqual(($0 as? OwnerError)?.code, "concurrent-publish") }
        release.signal()
        while owned.publishCount < 1 { usleep(1000) }
        XCTAssertEqual(try owned.publish([3]).version, 2, "the next publish after the first finished is fine")
    }

    func testUnknownSegmentsAndPublishesAfterStopAreRefused() throws {
        let owner = try makeOwner()
        XCTAssertThrowsError(try owner.segment("nope")) { XCTAssertEqual(($0 as? OwnerError)?.code, "no-such-segment") }
        let owned = try owner.segment("owned")
        try owner.start()
        try owned.publish([1])
        owner.stop()
        XCTAssertTrue(owner.isStopped)
        XCTAssertThrowsError(try owned.publish([2])) { XCTAssertEqual(($0 as? OwnerError)?.code, "segment-retired") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: socketPath), "the socket is removed on stop")
    }

    func testAnInvalidConfigNamesEveryProblem() throws {
        let path = try writeConfig(#"{"name": "a", "size": 64}, {"name": "a", "size": 64}, {"name": "b", "size": 0}"#)
        XCTAssertThrowsError(try ShmBrokerOwner(configPath: path, options: .init(handlesSignals: false))) { error in
            guard case .invalidConfiguration(let text) = error as? OwnerError else { return XCTFail("\(error)") }
            XCTAssertTrue(text.contains("$.segments[2].size"), text)
            XCTAssertTrue(text.contains("duplicate segment name"), text)
        }
    }

    /// Issue 17, item 28: segments defined in code, no JSON file, with the config file's checks
    /// and messages (JSON paths included).
    func testAConfigurationBuiltInCodeIsCheckedLikeAFile() throws {
        let good = BrokerConfiguration(socket: SocketSettings(path: socketPath), segments: [
            SegmentDefinition(name: "in-code", capacity: 4096, readers: AccessList(everyone: true), publishers: AccessList(users: [0])),
            SegmentDefinition(name: "sparse", capacity: 1 << 20, slots: 4, reservesMemory: false, persists: false),
        ])
        XCTAssertEqual(try good.validated(), good, "a valid configuration reads back unchanged")
        let owner = try ShmBrokerOwner(configuration: good, options: .init(handlesSignals: false, adoptsSystemdDescriptors: false))
        let segment = try owner.segment("in-code")
        try owner.start()
        XCTAssertEqual(try segment.publish([1, 2, 3]).version, 1)
        owner.stop()

        let bad = BrokerConfiguration(socket: SocketSettings(path: "relative.sock"), segments: [
            SegmentDefinition(name: "twice", capacity: 64), SegmentDefinition(name: "twice", capacity: 64),
            SegmentDefinition(name: "no spaces", capacity: 64), SegmentDefinition(name: "empty", capacity: 0),
            SegmentDefinition(name: "slots", capacity: 64, slots: 40),
        ])
        XCTAssertThrowsError(try ShmBrokerOwner(configuration: bad, options: .init(handlesSignals: false))) { error in
            guard case .invalidConfiguration(let text) = error as? OwnerError else { return XCTFail("\(error)") }
            for expected in ["the configuration built in code", "$.socket.path", "$.segments[1].name", "duplicate segment name",
                             "$.segments[2].name", "$.segments[3].size", "$.segments[4].slots"] {
                XCTAssertTrue(text.contains(expected), "\(expected) in: \(text)")
            }
        }
    }

    /// Issue 17, item 29: a loan of the next slot, filled in pieces, then published or dropped.
    func testALoanIsFilledInPlaceThenPublishedOrDropped() async throws {
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("owned")
        try owner.start()
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "loan-test")
        defer { client.close() }
        let handle = try await client.open("owned")

        let loan = try owned.loan(length: 8)
        XCTAssertThrowsError(try owned.publish([1])) { XCTAssertEqual(($0 as? OwnerError)?.code, "concurrent-publish") }
        for index in 0..<8 { loan.buffer[index] = UInt8(index * 3) }   // in pieces, in place
        XCTAssertNil(try handle.read(), "nothing is visible before the loan is published")
        let receipt = loan.publish()
        XCTAssertEqual(receipt.version, 1)
        let first = try XCTUnwrap(try handle.read())
        XCTAssertEqual(first.bytes, (0..<8).map { UInt8($0 * 3) })
        XCTAssertEqual(first.crc64, receipt.crc64)

        do {
            let dropped = try owned.loan(length: 4)
            dropped.buffer.initializeMemory(as: UInt8.self, repeating: 0xEE)
        }   // dropped unpublished
        XCTAssertEqual(try handle.read()?.version, 1, "a dropped loan changes nothing")
        XCTAssertEqual(try owned.publish([7]).version, 2, "and frees the segment")
        do {
            _ = try owned.loan(length: 5000)
            XCTFail("a loan larger than the capacity")
        } catch {
            XCTAssertEqual(error.code, "payload-too-large")
        }
        XCTAssertEqual(try owned.publish([8]).version, 3, "a refused loan frees the segment too")
    }

    /// Issue 20, items 1 and 2: versions filled in pieces (by blocks, appended, marked written)
    /// reach a client that reads them block by block, verified, with the receipts' CRCs.
    func testVersionsFilledInPiecesAreReadBlockByBlock() async throws {
        let path = try writeConfig("""
            {"name": "frames", "size": "300KiB", "readers": {"users": ["*"]}}
            """)
        let owner = try ShmBrokerOwner(configPath: path, options: .init(handlesSignals: false, adoptsSystemdDescriptors: false))
        defer { owner.stop() }
        let frames = try owner.segment("frames")
        try owner.start()
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "blocks-test")
        defer { client.close() }
        let handle = try await client.open("frames")
        let frame = (0..<(300 << 10) - 7).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }

        func readBack() throws -> ([UInt8], [Int], UInt64?) {
            var bytes: [UInt8] = [], offsets: [Int] = []
            let read = try handle.readBlocks { block in
                if block.offset == 0 { bytes = []; offsets = [] }
                offsets.append(block.offset)
                bytes += block.bytes
            }
            return (bytes, offsets, read?.crc64)
        }
        var handed: [Int] = []
        let byBlocks = try frames.publish(length: frame.count, fillingBlocks: { block, offset in
            handed.append(offset)
            frame.withUnsafeBytes { block.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + block.count])) }
        })
        XCTAssertEqual(handed, Array(stride(from: 0, to: frame.count, by: 16384)))
        XCTAssertEqual(byBlocks.crc64, CRC64.checksum(frame))
        var (bytes, offsets, crc) = try readBack()
        XCTAssertEqual(bytes, frame)
        XCTAssertEqual(offsets, handed)
        XCTAssertEqual(crc, byBlocks.crc64)

        var loan = try frames.loan(length: frame.count)
        frame.withUnsafeBytes { all in
            loan.append(UnsafeRawBufferPointer(rebasing: all[..<100_000]))
            loan.buffer.baseAddress!.advanced(by: 100_000).copyMemory(from: all.baseAddress! + 100_000, byteCount: 50_000)
            loan.markWritten(through: 150_000)
            loan.buffer.baseAddress!.advanced(by: 150_000).copyMemory(from: all.baseAddress! + 150_000, byteCount: frame.count - 150_000)
        }
        XCTAssertEqual(loan.written, 150_000)
        let loaned = loan.publish()
        XCTAssertEqual(loaned.version, 2)
        XCTAssertEqual(loaned.crc64, CRC64.checksum(frame), "appended, marked and unmarked pieces add up")
        (bytes, offsets, crc) = try readBack()
        XCTAssertEqual(bytes, frame)
        XCTAssertEqual(crc, loaned.crc64)

        struct Refused: Error {}
        XCTAssertThrowsError(try frames.publish(length: frame.count, fillingBlocks: { _, offset in if offset > 0 { throw Refused() } })) {
            XCTAssertTrue($0 is Refused)
        }
        XCTAssertEqual(try handle.read()?.version, 2, "a fill that throws leaves the latest version")
    }

    /// Issue 17, item 30: plain values and arrays of them, published and read without byte juggling.
    func testTypedValuesAndArraysRoundTrip() async throws {
        struct Sample: BitwiseCopyable, Equatable { var temperature: Double; var sequence: UInt32; var flags: UInt16 }
        let owner = try makeOwner()
        defer { owner.stop() }
        let owned = try owner.segment("owned")
        try owner.start()
        let client = try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "typed-test")
        defer { client.close() }
        let handle = try await client.open("owned")
        let sample = Sample(temperature: 21.5, sequence: 7, flags: 3)
        try owned.publish(value: sample)
        let read = try XCTUnwrap(try handle.read(Sample.self))
        XCTAssertEqual(read.value, sample)
        XCTAssertThrowsError(try handle.read(UInt8.self), "a value of another size is refused")
        try owned.publish(values: [1.5, 2.5, 3.5] as [Float])
        XCTAssertEqual(try handle.readArray(of: Float.self)?.values, [1.5, 2.5, 3.5])
        XCTAssertThrowsError(try handle.readArray(of: Sample.self), "12 bytes are not whole Samples")
        // Through the daemon's client API too.
        let open = try await client.open("open")
        try await client.publish("open", value: UInt64(0xDEAD_BEEF))
        XCTAssertEqual(try open.read(UInt64.self)?.value, 0xDEAD_BEEF)
    }

    /// Issue 18: claiming segments from one thread while the loop reloads the configuration
    /// (which replaces it) on its own: the claim asks the loop, so the two never touch the
    /// configuration at once (`swift test --sanitize=thread` runs this in CI with no report).
    func testClaimsRaceNoReloads() throws {
        let with = """
            {"name": "owned", "size": 4096, "readers": {"users": ["*"]}},
            {"name": "extra", "size": 64, "readers": {"users": ["*"]}}
            """
        let without = #"{"name": "owned", "size": 4096, "readers": {"users": ["*"]}}"#
        let path = try writeConfig(with)
        let owner = try ShmBrokerOwner(configPath: path, options: .init(handlesSignals: false, adoptsSystemdDescriptors: false))
        defer { owner.stop() }
        try owner.start()
        let done = ManagedAtomicFlag()
        let socket = socketPath
        let reloader = Thread {
            for round in 0..<40 {
                try? Data(Self.config(socketPath: socket, segments: round % 2 == 0 ? without : with).utf8).write(to: URL(fileURLWithPath: path))
                owner.reload()
            }
            done.set()
        }
        reloader.start()
        var claims = 0, refusals = 0
        while !done.isSet {
            // A name not claimed yet is looked up in the configuration every time.
            for name in ["extra", "absent"] {
                do {
                    _ = try owner.segment(name)
                    claims += 1
                } catch {
                    refusals += 1
                }
            }
        }
        XCTAssertGreaterThan(refusals, 0, "the absent name is refused each time")
        let status = try owner.segment("owned")
        XCTAssertNoThrow(try status.publish([1]), "the owner still publishes after 40 reloads")
    }
}

/// A flag one thread sets and another reads.
private final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
