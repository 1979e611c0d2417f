import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// Publish rings: a producer appends to shared memory, the real daemon consumes into the segment.
final class PublishRingTests: XCTestCase {
    /// Every payload a producer process appends becomes a version, in order and intact, for a
    /// reader process that checks each one; the ring wraps many times and the producer waits
    /// while it is full.
    func testRingPublishesEveryPayloadInOrderThroughWrapsAndFullRings() async throws {
        let daemon = try TestDaemon(segments: [segment("bulk", size: "256KiB", slots: 3)])
        defer { daemon.stop() }
        let count = 3000
        let follower = try ChildProcess(Binaries.testKit, ["reader", "--socket", daemon.socketPath, "--segment", "bulk",
                                                           "--until-version", "\(count)", "--timeout", "120"])
        XCTAssertTrue(follower.waitForStderr("reading"), follower.stderrText)
        let producer = try runToCompletion(Binaries.testKit, ["ring-producer", "--socket", daemon.socketPath, "--segment", "bulk",
                                                              "--count", "\(count)", "--max-length", "\(256 << 10)"])
        XCTAssertEqual(producer.status, 0, producer.stderr)
        let produced = try producer.json()
        XCTAssertEqual(produced["lastVersion"] as? Int, count, "one version per payload: \(produced)")
        XCTAssertEqual(produced["consumed"] as? Int, count, "\(produced)")
        XCTAssertEqual(produced["refused"] as? Int, 0, "\(produced)")

        let followed = follower.finish(timeout: 120)
        XCTAssertEqual(followed.status, 0, followed.stderr)
        let summary = try followed.json()
        XCTAssertEqual(summary["lastVersion"] as? Int, count, "\(summary)")
        XCTAssertEqual(summary["mismatches"] as? Int, 0, "version k carries payload k, intact: \(summary)")
        XCTAssertEqual(summary["crcFailures"] as? Int, 0, "\(summary)")
        XCTAssertEqual(summary["regressions"] as? Int, 0, "\(summary)")
        XCTAssertGreaterThan(summary["distinctVersions"] as? Int ?? 0, 1, "\(summary)")

        let client = try await daemon.connect()
        let status = try await client.status()
        XCTAssertEqual(status.counters.publishes, UInt64(count))
        // The library's own checks agree: the last version is a full, verified read.
        let handle = try await client.open("bulk")
        XCTAssertEqual(try handle.read()?.version, UInt64(count))
    }

    /// The CPU time a process has used (user and system, from /proc; 10 ms resolution).
    func cpuSeconds(of pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.range(of: ")")!.upperBound...].split(separator: " ")
        return (Double(fields[11])! + Double(fields[12])!) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Issue 20, item 4: a daemon told to spin on its rings ("a core for latency") polls them for
    /// the configured window after an entry, spending a core, then sleeps again; versions
    /// published inside and after the window all arrive. Without the setting it sleeps at once.
    func testADaemonThatSpinsOnItsRingsSpendsACoreForTheWindowOnlyAndLosesNothing() async throws {
        for spinning in [true, false] {
            let daemon = try TestDaemon(segments: [segment("hot", size: 64)],
                                        extraConfig: spinning ? ["publishRings": ["spinMicroseconds": 400_000]] : [:])
            defer { daemon.stop() }
            let client = try await daemon.connect()
            let publisher = try await client.openPublisher("hot")
            let handle = try await client.open("hot")
            try publisher.publish([1])
            _ = try publisher.flush()
            let afterFirst = try cpuSeconds(of: daemon.pid)
            usleep(300_000)                                    // inside the window
            let inWindow = try cpuSeconds(of: daemon.pid) - afterFirst
            try publisher.publish([2])
            XCTAssertEqual(try publisher.flush().lastVersion, 2)
            usleep(600_000)                                    // the window closes 400 ms after version 2
            let settled = try cpuSeconds(of: daemon.pid)
            usleep(500_000)
            let afterWindow = try cpuSeconds(of: daemon.pid) - settled
            if spinning {
                XCTAssertGreaterThan(inWindow, 0.15, "the daemon polled its rings during the window")
            } else {
                XCTAssertLessThan(inWindow, 0.1, "without the setting, the daemon sleeps between entries")
            }
            XCTAssertLessThan(afterWindow, 0.1, "after the window the daemon sleeps (spinning: \(spinning))")
            // The doorbell works again once the daemon sleeps.
            try publisher.publish([3])
            XCTAssertEqual(try publisher.flush(timeoutNanoseconds: 5_000_000_000).lastVersion, 3)
            XCTAssertEqual(try handle.read()?.bytes, [3])
            await publisher.close()
        }
    }

    /// Oversize payloads are refused before anything is appended; closing publishes what is left;
    /// a second publisher for the same segment on one client is refused with a reason.
    func testOversizeRefusedDuplicateRefusedAndCloseDrains() async throws {
        let daemon = try TestDaemon(segments: [segment("small", size: 100)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let publisher = try await client.openPublisher("small")
        do {
            try publisher.publish([UInt8](repeating: 1, count: 101))
            XCTFail("an oversize payload was accepted")
        } catch {
            XCTAssertEqual(error.code, .payloadTooLarge)
            XCTAssertTrue("\(error)".contains("capacity of 100"), "\(error)")
        }
        do {
            _ = try await client.openPublisher("small")
            XCTFail("a second ring for the same segment was attached")
        } catch {
            XCTAssertEqual(error.code, .invalidRing)
        }
        let listed = try await client.status().clients.first { $0.pid == getpid() }?.rings
        XCTAssertEqual(listed, ["small"], "STATUS lists the attached ring")
        for value in 1...50 { try publisher.publish([UInt8(value)]) }
        await publisher.close()
        let reader = try await client.open("small")
        XCTAssertEqual(try reader.read()?.bytes, [50], "closing published what was appended")
        XCTAssertEqual(try reader.read()?.version, 50)
        do {
            try publisher.publish([1])
            XCTFail("a closed publisher accepted a payload")
        } catch {
            XCTAssertEqual(error.code, .invalidRing)
        }
        // After closing, the segment can take a new ring.
        let again = try await client.openPublisher("small")
        try again.publish([7])
        XCTAssertEqual(try again.flush().lastVersion, 51)
    }

    /// A publisher dropped without close() is detached in the background: what it appended is
    /// published and the segment takes a new publisher on the same client.
    func testADroppedPublisherIsDetachedAndItsEntriesPublished() async throws {
        let daemon = try TestDaemon(segments: [segment("dropped", size: 64)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        do {
            let publisher = try await client.openPublisher("dropped")
            for value in 1...20 { try publisher.publish([UInt8(value)]) }
        }
        try await waitUntil { try await client.status().clients.allSatisfy { $0.rings.isEmpty } }
        let reader = try await client.open("dropped")
        XCTAssertEqual(try reader.read()?.bytes, [20])
        let again = try await client.openPublisher("dropped")
        try again.publish([21])
        XCTAssertEqual(try again.flush().lastVersion, 21)
        await again.close()
    }

    /// A producer that exits without flushing still has its appended payloads published.
    func testPayloadsOfAProducerThatExitedArePublished() async throws {
        let daemon = try TestDaemon(segments: [segment("last-words", size: 64)])
        defer { daemon.stop() }
        let producer = try runToCompletion(Binaries.testKit, ["ring-producer", "--socket", daemon.socketPath,
                                                              "--segment", "last-words", "--count", "500", "--no-flush"])
        XCTAssertEqual(producer.status, 0, producer.stderr)
        let client = try await daemon.connect()
        let reader = try await client.open("last-words")
        try await waitUntil { reader.latestVersion == 500 }
        XCTAssertEqual(try reader.read()?.bytes.count, 64, "the 500th payload (a multiple of 5: full length), verified")
    }

    /// Rings that are not rings, or that break the rules later, get a precise refusal or are
    /// detached with a reason in the ring; the daemon and its other clients carry on.
    /// A library ring is allocated and mapped before its first publish, in the producer and in
    /// the daemon (no page faults on its first lap); a sparse ring file from another producer is
    /// mapped without populating, so its holes are not allocated on the daemon's account.
    func testLibraryRingsArePrefaultedAndSparseRingsAreNot() async throws {
        let daemon = try TestDaemon(segments: [segment("big", size: "4MiB"), segment("other", size: "4MiB")])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let publisher = try await client.openPublisher("big")
        let ringBytes = PublishRingLayout.headerSize + PublishRingLayout.dataSize(forCapacity: 4 << 20)
        let resident = try XCTUnwrap(ringMappings(of: daemon.pid).first, "the daemon maps the ring")
        XCTAssertEqual(resident.size, ringBytes)
        XCTAssertEqual(resident.rss, ringBytes, "every page of the library's ring is mapped in the daemon at attach")
        await publisher.close()

        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let doorbell = try Doorbell()
        defer { doorbell.close() }
        let file = try MemoryFile.createScratch(name: "shmbroker-ring", sealedAgainstShrinking: true)
        defer { file.closeQuietly() }
        try file.setSize(ringBytes)  // sparse: only the pages written below exist
        let region = try MappedRegion(mapping: file, length: ringBytes, writable: true)
        _ = PublishRingProducer(formatting: region, dataSize: ringBytes - PublishRingLayout.headerSize)
        guard case .ringAttached = try raw.request(.attachRing(segment: "other"), descriptors: [file, doorbell.descriptor]) else {
            return XCTFail("the sparse ring was refused")
        }
        let sparse = try XCTUnwrap(ringMappings(of: daemon.pid).first { $0.size == ringBytes })
        XCTAssertLessThan(sparse.rss, ringBytes / 4, "a sparse ring is not populated by the daemon: \(sparse)")
        guard case .statusReport = try raw.request(.status) else { return XCTFail("the daemon stopped serving") }
    }

    /// Size and resident bytes of each publish-ring mapping (memfd "shmbroker-ring") of `pid`.
    private func ringMappings(of pid: Int32) throws -> [(size: Int, rss: Int)] {
        // (String(contentsOfFile:) stops after the first 4 KiB of a /proc file.)
        let handle = try XCTUnwrap(FileHandle(forReadingAtPath: "/proc/\(pid)/smaps"))
        defer { try? handle.close() }
        let smaps = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
        var found: [(size: Int, rss: Int)] = []
        var inRing = false
        for line in smaps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if let first = fields.first, first.contains("-"), fields.count >= 5 {
                inRing = line.contains("memfd:shmbroker-ring")
            } else if inRing, fields.count >= 2, let kilobytes = Int(fields[1]) {
                if fields[0] == "Size:" { found.append((kilobytes << 10, 0)) }
                if fields[0] == "Rss:", !found.isEmpty { found[found.count - 1].rss = kilobytes << 10 }
            }
        }
        return found
    }

    func testHostileRingsAreRefusedOrDetachedAndTheDaemonCarriesOn() async throws {
        let daemon = try TestDaemon(segments: [segment("target", size: 4096)])
        defer { daemon.stop() }
        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let doorbell = try Doorbell()
        defer { doorbell.close() }

        func ringFile(sealed: Bool = true, dataSize: Int = 256 << 10, format: Bool = true) throws -> (FileDescriptor, PublishRingProducer?) {
            let file = try MemoryFile.createScratch(name: "test-ring", sealedAgainstShrinking: sealed)
            try file.setSize(PublishRingLayout.headerSize + dataSize)
            guard format else { return (file, nil) }
            let region = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + dataSize, writable: true)
            return (file, PublishRingProducer(formatting: region, dataSize: dataSize))
        }
        func attach(_ file: FileDescriptor, _ bell: FileDescriptor? = nil) throws -> ServerMessage {
            try raw.request(.attachRing(segment: "target"), descriptors: [file] + [bell ?? doorbell.descriptor])
        }

        let missing = try raw.request(.attachRing(segment: "target"), descriptors: [doorbell.descriptor])
        XCTAssertEqual(errorCode(missing), .missingDescriptor, "\(missing)")

        let (unsealed, _) = try ringFile(sealed: false)
        defer { unsealed.closeQuietly() }
        let notSealed = try attach(unsealed)
        XCTAssertEqual(errorCode(notSealed), .invalidRing)
        XCTAssertTrue("\(notSealed)".contains("F_SEAL_SHRINK"), "\(notSealed)")

        let (blank, _) = try ringFile(format: false)
        defer { blank.closeQuietly() }
        let badMagic = try attach(blank)
        XCTAssertEqual(errorCode(badMagic), .invalidRing)
        XCTAssertTrue("\(badMagic)".contains("magic"), "\(badMagic)")

        let (good, producer) = try ringFile()
        defer { good.closeQuietly() }
        var pipeEnds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pipeEnds), 0)
        defer { pipeEnds.forEach { _ = Glibc.close($0) } }
        let notEventFD = try attach(good, FileDescriptor(rawValue: pipeEnds[0]))
        XCTAssertEqual(errorCode(notEventFD), .badDescriptor)
        XCTAssertTrue("\(notEventFD)".contains("eventfd"), "\(notEventFD)")

        // A valid ring: an entry longer than the segment is refused and counted, the next published.
        guard case .ringAttached(let capacity, _) = try attach(good), let ring = producer else {
            return XCTFail("a valid ring was refused")
        }
        XCTAssertEqual(capacity, 4096)
        let oversize = [UInt8](repeating: 9, count: 5000)
        if try oversize.withUnsafeBytes({ try ring.append($0, timeoutNanoseconds: nil) }) { doorbell.ring() }
        if try [UInt8]([1, 2, 3]).withUnsafeBytes({ try ring.append($0, timeoutNanoseconds: nil) }) { doorbell.ring() }
        let results = try ring.waitUntilConsumed(timeoutNanoseconds: 30_000_000_000)
        XCTAssertEqual(results.refusedEntries, 1)
        XCTAssertEqual(results.lastRefusalCode, UInt32(ErrorCode.payloadTooLarge.rawValue))
        XCTAssertEqual(results.lastVersion, 1)
        XCTAssertEqual(results.consumedEntries, 2)

        // Then the producer scribbles a head far beyond the ring: detached with invalid-ring.
        let base = try MappedRegion(mapping: good, length: PublishRingLayout.headerSize, writable: true)
        let tail = base.base.load(fromByteOffset: PublishRingLayout.Header.tail, as: UInt64.self)
        base.base.storeBytes(of: tail + (1 << 40), toByteOffset: PublishRingLayout.Header.head, as: UInt64.self)
        doorbell.ring()
        let deadline = Date().addingTimeInterval(30)
        while ring.results.detachedCode == 0 && Date() < deadline { usleep(5_000) }
        XCTAssertEqual(ring.results.detachedCode, UInt32(ErrorCode.invalidRing.rawValue), "the broken ring was detached with a reason")

        // The daemon carries on for everyone, including this connection.
        let client = try await daemon.connect()
        try await client.publish("target", bytes: [4])
        let status = try await client.status()
        XCTAssertEqual(status.segments.first?.version, 2)
        XCTAssertGreaterThanOrEqual(status.counters.malformedRequests, 1)
        guard case .statusReport = try raw.request(.status) else { return XCTFail("the hostile connection was dropped") }
    }

    /// A producer that keeps scribbling over its own entries while the daemon copies them garbles
    /// only its own data: the ring stays attached and every version a reader process checks
    /// matches its CRC. (The copy itself is tested to the byte, with a much denser scribbler, by
    /// `CopyUnderConcurrentWritesTests` in the core tests.)
    func testAProducerScribblingItsEntriesNeverCausesACorruptVersion() async throws {
        let daemon = try TestDaemon(segments: [segment("noisy", size: 100, slots: 2)])
        defer { daemon.stop() }
        let count = 3000
        let follower = try ChildProcess(Binaries.testKit, ["reader", "--socket", daemon.socketPath, "--segment", "noisy",
                                                           "--until-version", "\(count)", "--timeout", "120"])
        XCTAssertTrue(follower.waitForStderr("reading"), follower.stderrText)

        let raw = try RawConnection(socketPath: daemon.socketPath)
        try raw.hello()
        let doorbell = try Doorbell()
        defer { doorbell.close() }
        let dataSize = 64 << 10
        let file = try MemoryFile.createScratch(name: "noisy-ring", sealedAgainstShrinking: true)
        defer { file.closeQuietly() }
        try file.setSize(PublishRingLayout.headerSize + dataSize)
        let region = try MappedRegion(mapping: file, length: PublishRingLayout.headerSize + dataSize, writable: true)
        let ring = PublishRingProducer(formatting: region, dataSize: dataSize)
        guard case .ringAttached = try raw.request(.attachRing(segment: "noisy"), descriptors: [file, doorbell.descriptor]) else {
            return XCTFail("the ring was refused")
        }
        // Entries of 100 bytes occupy 128-byte blocks: payload bytes are 16..<116 of each block.
        let stop = ManagedAtomicFlag()
        nonisolated(unsafe) let data = region.base + PublishRingLayout.headerSize
        let scribbler = Thread {
            var generator = SplitMix64(seed: 7)
            while !stop.isSet {
                let value = generator.next()
                let block = Int(value % UInt64(dataSize / 128)), offset = 16 + Int((value >> 20) % 100)
                data.storeBytes(of: UInt8(truncatingIfNeeded: value >> 40), toByteOffset: block * 128 + offset, as: UInt8.self)
            }
        }
        scribbler.start()
        let payload = [UInt8](repeating: 0xAB, count: 100)
        for index in 0..<count {
            if try payload.withUnsafeBytes({ try ring.append($0, timeoutNanoseconds: 30_000_000_000) }) { doorbell.ring() }
            if index % 16 == 0 { usleep(100) }  // let the scribbler and the reader in
        }
        let results = try ring.waitUntilConsumed(timeoutNanoseconds: 60_000_000_000)
        stop.set()
        XCTAssertEqual(results.lastVersion, UInt64(count))
        XCTAssertEqual(results.detachedCode, 0, "scribbled payloads are not a broken ring")

        let followed = follower.finish(timeout: 120)
        XCTAssertEqual(followed.status, 0, followed.stderr)
        let summary = try followed.json()
        XCTAssertEqual(summary["crcFailures"] as? Int, 0, "every version matched its CRC: \(summary)")
        XCTAssertEqual(summary["lastVersion"] as? Int, count, "\(summary)")
        XCTAssertGreaterThan(summary["distinctVersions"] as? Int ?? 0, 1, "the reader checked versions as they came: \(summary)")
    }

    /// A reload that resizes the segment keeps its ring working (into the new segment); one that
    /// removes the segment detaches the ring, and the producer learns why.
    func testReloadResizingKeepsTheRingAndRemovingDetachesIt() async throws {
        let daemon = try TestDaemon(segments: [segment("a", size: 64), segment("b", size: 64)], withNotifySocket: true)
        defer { daemon.stop() }
        let notify = try XCTUnwrap(daemon.notify)
        let client = try await daemon.connect()
        let toResize = try await client.openPublisher("a")
        let toRemove = try await client.openPublisher("b")
        try toResize.publish([1])
        try toRemove.publish([1])
        XCTAssertEqual(try toResize.flush().lastVersion, 1)
        XCTAssertEqual(try toRemove.flush().lastVersion, 1)

        try daemon.rewriteConfig(segments: [segment("a", size: 128)])
        daemon.child.signal(SIGHUP)
        XCTAssertNotNil(notify.waitFor("RELOADING=1"))
        XCTAssertNotNil(notify.waitFor("READY=1"))

        try toResize.publish([UInt8](repeating: 2, count: 100))
        let resized = try toResize.flush()
        XCTAssertEqual(resized.lastLength, 100, "the entry went into the resized segment")
        let reader = try await client.open("a")
        XCTAssertEqual(try reader.read()?.bytes, [UInt8](repeating: 2, count: 100))

        do {
            try toRemove.publish([2])
            try toRemove.flush()
            XCTFail("a ring to a removed segment kept working")
        } catch {
            XCTAssertEqual(error.code, .segmentRetired, "\(error)")
        }
    }

    /// After a daemon restart the client re-attaches its ring by itself and publishing resumes.
    func testPublisherResumesAfterADaemonRestart() async throws {
        let daemon = try TestDaemon(segments: [segment("feed", size: 64)])
        defer { daemon.stop() }
        let client = try await daemon.connect()
        let publisher = try await client.openPublisher("feed")
        try publisher.publish([1])
        XCTAssertEqual(try publisher.flush().lastVersion, 1)

        try daemon.restart()
        // Publishing resumes once the client has reconnected (a call meanwhile may report the loss).
        let observer = try await daemon.connect()
        let deadline = Date().addingTimeInterval(30)
        var resumed = false
        while !resumed && Date() < deadline {
            do {
                try publisher.publish([2])
                resumed = try publisher.flush(timeoutNanoseconds: 2_000_000_000).lastVersion >= 1
            } catch {
                XCTAssertTrue(error == .disconnected || error.code == .connectionLost || { if case .timedOut = error { return true }; return false }(), "\(error)")
                try await Task.sleep(nanoseconds: 50_000_000)
            }
        }
        XCTAssertTrue(resumed, "the ring was re-attached to the new daemon")
        let reader = try await observer.open("feed")
        XCTAssertEqual(try reader.read()?.bytes, [2])
    }
}

/// A flag one thread sets and another polls.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}
