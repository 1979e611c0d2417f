import Foundation
import Glibc
import Logging
@testable import ShmBroker
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage
import XCTest

/// The request router without sockets, in the spirit of swift-nio's embedded channel: a request
/// in, a reply and its descriptors out, for every request type and the errors each can answer.
/// The segments are real (memfds, mappings); the clients are records with no connection.
final class RouterTests: XCTestCase {
    var server: BrokerServer!

    override func setUpWithError() throws {
        let configuration = BrokerConfiguration(
            socket: SocketSettings(path: "/nonexistent/router-test.sock"),
            segments: [
                SegmentDefinition(name: "public", capacity: 4096, readers: AccessList(everyone: true), publishers: AccessList(everyone: true)),
                SegmentDefinition(name: "readonly", capacity: 64, readers: AccessList(everyone: true)),
                SegmentDefinition(name: "hidden", capacity: 64, readers: AccessList(users: [0])),
            ])
        server = try BrokerServer(configuration: configuration, configPath: "", signals: nil,
                                  logger: Logger(label: "router-test") { _ in SwiftLogNoOpLogHandler() })
        for definition in configuration.segments { server.addSegment(try server.restoreOrCreate(definition)) }
    }

    func client(uid: UInt32, greeted: Bool = true) -> ClientConnection {
        let client = ClientConnection(id: server.clients.takeID(), socket: FileDescriptor(rawValue: -1),
                                      credentials: PeerCredentials(pid: 1, uid: uid, gid: uid, groups: []))
        client.greeted = greeted
        server.clients.add(client)
        return client
    }

    func respond(_ request: Request, from client: ClientConnection, descriptors: [FileDescriptor] = []) -> Response {
        let received = ReceivedDescriptors(descriptors)
        defer { received.closeRest() }
        return server.respond(to: request, descriptors: received, from: client)
    }

    func reply(_ request: Request, from client: ClientConnection, descriptors: [FileDescriptor] = [],
               file: StaticString = #filePath, line: UInt = #line) -> Reply? {
        guard case .reply(let reply) = respond(request, from: client, descriptors: descriptors) else {
            XCTFail("\(request) was refused", file: file, line: line)
            return nil
        }
        return reply
    }

    func refusal(_ request: Request, from client: ClientConnection, descriptors: [FileDescriptor] = []) -> ProtocolError? {
        guard case .refusal(let error) = respond(request, from: client, descriptors: descriptors) else { return nil }
        return error
    }

    var root: ClientConnection { client(uid: 0) }
    var nobody: ClientConnection { client(uid: 65534) }

    func testHelloAnswersTheOwnerAndItsVersionAndRefusesOtherProtocols() {
        let fresh = client(uid: 0, greeted: false)
        let hello = reply(.hello(protocolVersion: ControlProtocol.version, clientName: "router-test"), from: fresh)
        XCTAssertEqual(hello?.message, .helloOK(protocolVersion: ControlProtocol.version, maximumFrameSize: UInt32(ControlProtocol.maximumFrameSize),
                                                daemonVersion: "shmbrokerd \(ShmBrokerVersion.string)"))
        XCTAssertTrue(fresh.greeted)
        XCTAssertEqual(fresh.name, "router-test")
        XCTAssertEqual(refusal(.hello(protocolVersion: 2, clientName: "x"), from: client(uid: 0, greeted: false))?.code, .unsupportedProtocolVersion)
    }

    func testOpenHandsOutAReadOnlySealedSegmentAndItsBoard() throws {
        let reader = nobody
        let opened = try XCTUnwrap(reply(.open(segment: "public"), from: reader))
        guard case .opened(let info) = opened.message else { return XCTFail("\(opened.message)") }
        XCTAssertEqual(info.capacity, 4096)
        XCTAssertEqual(info.layoutVersion, SegmentLayout.layoutVersion)
        XCTAssertEqual(opened.descriptors.count, 2)
        defer { opened.descriptors.forEach { $0.closeQuietly() } }
        XCTAssertEqual(try opened.descriptors[0].fileSize(), Int(info.mappingSize))
        XCTAssertNoThrow(try MemoryFile.checkMappable(opened.descriptors[0], length: Int(info.mappingSize)))
        XCTAssertEqual(try opened.descriptors[1].fileSize(), SegmentLayout.WaitBoard.size)
        XCTAssertThrowsError(try MappedRegion(mapping: opened.descriptors[0], length: Int(info.mappingSize), writable: true),
                             "the segment descriptor is read-only")
        XCTAssertTrue(server.segments["public"]!.readers.contains(reader.id))
        XCTAssertTrue(reader.opened.contains("public"))
    }

    func testAHiddenNameIsAnsweredLikeAnAbsentOneAndBadNamesAreRefused() {
        let hidden = refusal(.open(segment: "hidden"), from: nobody)
        let absent = refusal(.open(segment: "absent"), from: nobody)
        XCTAssertEqual(hidden?.code, .noSuchSegment)
        XCTAssertEqual(hidden?.message.replacingOccurrences(of: "hidden", with: "X"), absent?.message.replacingOccurrences(of: "absent", with: "X"))
        XCTAssertEqual(refusal(.subscribe(segment: "hidden"), from: nobody)?.code, .noSuchSegment)
        XCTAssertEqual(refusal(.open(segment: "../etc"), from: root)?.code, .invalidSegmentName)
        XCTAssertNotNil(reply(.open(segment: "hidden"), from: root).map { $0.descriptors.forEach { $0.closeQuietly() } })
    }

    func testSubscribeReportsTheLatestVersionAndUnsubscribeOnlyWhenSubscribed() {
        let subscriber = nobody
        XCTAssertEqual(reply(.subscribe(segment: "public"), from: subscriber)?.message,
                       .subscribed(PublishReceipt(version: 0, length: 0, crc64: 0, publishedAtNanoseconds: 0)))
        XCTAssertTrue(server.segments["public"]!.subscribers.contains(subscriber.id))
        XCTAssertEqual(reply(.unsubscribe(segment: "public"), from: subscriber)?.message, .ok)
        XCTAssertEqual(refusal(.unsubscribe(segment: "public"), from: subscriber)?.code, .notSubscribed)
    }

    func testPublishCommitsThroughThePipelineAndRefusesWhatItMust() throws {
        let publisher = nobody
        guard case .published(let first)? = reply(.publish(segment: "public", payload: .inline([1, 2, 3])), from: publisher)?.message else {
            return XCTFail("no PUBLISHED")
        }
        XCTAssertEqual(first.version, 1)
        XCTAssertEqual(server.segments["public"]!.writer.latestVersion, 1)
        XCTAssertEqual(server.counters[segment: "public"].publishes, 1)
        XCTAssertEqual(refusal(.publish(segment: "public", payload: .inline([UInt8](repeating: 0, count: 5000))), from: publisher)?.code,
                       .payloadTooLarge)
        XCTAssertEqual(refusal(.publish(segment: "readonly", payload: .inline([1])), from: publisher)?.code, .permissionDenied)
        // An attached memfd: published, and the router closes it.
        let payload = try [UInt8](repeating: 7, count: 3000).withUnsafeBytes { try MemoryFile.create(name: "payload", contents: $0) }
        guard case .published(let second)? = reply(.publish(segment: "public", payload: .attachedFile(length: 3000)), from: publisher,
                                                    descriptors: [payload])?.message else { return XCTFail("no PUBLISHED") }
        XCTAssertEqual(second.version, 2)
        XCTAssertEqual(second.length, 3000)
        XCTAssertThrowsError(try payload.fileSize(), "the attached file was closed")
        // A file on a disk file system is not read (it could block the loop).
        let path = "/var/tmp/shmbroker-router-\(getpid())"
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: 16))
        defer { unlink(path) }
        let disk = try FileDescriptor.open(path, .readOnly)
        let diskRefusal = refusal(.publish(segment: "public", payload: .attachedFile(length: 16)), from: publisher, descriptors: [disk])
        if (try? MemoryFile.seals(of: disk)) == nil { XCTAssertEqual(diskRefusal?.code, .badDescriptor) }
    }

    func testAnOwnerPublishedSegmentRefusesOtherPublishers() throws {
        let owned = OwnedSegment(name: "public", doorbell: server.loop.doorbell)
        XCTAssertNil(server.claim(owned))
        XCTAssertEqual(refusal(.publish(segment: "public", payload: .inline([1])), from: root)?.code, .ownerPublishes)
        XCTAssertEqual(try owned.publish([9]).version, 1)
        guard case .opened? = reply(.open(segment: "public"), from: nobody).map({ reply in
            reply.descriptors.forEach { $0.closeQuietly() }
            return reply.message
        }) else { return XCTFail("readers may still open it") }
    }

    func testStatusAndMetricsShowEachPeerWhatItMaySee() throws {
        _ = reply(.publish(segment: "public", payload: .inline([1])), from: root)
        guard case .statusReport(let json)? = reply(.status, from: nobody)?.message else { return XCTFail("no STATUS_REPORT") }
        let report = try StatusReport.decode(json)
        XCTAssertEqual(report.segments.map(\.name), ["public", "readonly"])
        XCTAssertEqual(report.daemon.name, "shmbrokerd")
        guard case .statusReport(let all)? = reply(.status, from: root)?.message else { return XCTFail("no STATUS_REPORT") }
        XCTAssertEqual(try StatusReport.decode(all).segments.map(\.name), ["public", "readonly", "hidden"])
        guard case .metricsReport(let text)? = reply(.metrics, from: nobody)?.message else { return XCTFail("no METRICS_REPORT") }
        let metrics = String(decoding: text, as: UTF8.self)
        XCTAssertTrue(metrics.contains(#"shmbroker_segment_publishes_total{segment="public"} 1"#), metrics)
        XCTAssertFalse(metrics.contains("hidden"), metrics)
    }

    func testRingsAreCheckedAndDetachingNeedsARing() throws {
        let producer = nobody
        let notARing = try MemoryFile.create(name: "not-a-ring", size: 8192, mode: 0o600)
        let notADoorbell = try MemoryFile.create(name: "not-a-doorbell", size: 8, mode: 0o600)
        let code = refusal(.attachRing(segment: "public"), from: producer, descriptors: [notARing, notADoorbell])?.code
        XCTAssertEqual(code, .invalidRing, "a file with no ring header")
        XCTAssertThrowsError(try notARing.fileSize(), "the router closed both descriptors")
        XCTAssertThrowsError(try notADoorbell.fileSize())
        XCTAssertEqual(refusal(.detachRing(segment: "public"), from: producer)?.code, .invalidRing)
        XCTAssertEqual(refusal(.attachRing(segment: "readonly"), from: producer,
                               descriptors: [try MemoryFile.create(name: "r", size: 8192), try MemoryFile.create(name: "d", size: 8)])?.code,
                       .permissionDenied)
    }
}
