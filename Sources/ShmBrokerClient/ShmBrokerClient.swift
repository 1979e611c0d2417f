import Foundation
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import Synchronization
import SystemPackage

/// A connection to `shmbrokerd`'s control socket.
///
/// Open segments to read them through shared memory, subscribe to version events, publish (if the
/// daemon's config allows your uid), and ask for status. Requests may be issued concurrently from
/// any task; a background thread receives replies and events.
///
/// ```swift
/// let client = try await ShmBrokerClient.connect(socketPath: "/run/shmbroker/control.sock")
/// let segment = try await client.open("telemetry")
/// if let snapshot = try segment.read() { print(snapshot.version, snapshot.bytes.count) }
/// ```
public final class ShmBrokerClient: Sendable {
    /// The path this client connected to.
    public let socketPath: String
    /// The daemon's version, from the handshake.
    public let daemonVersion: String

    private let connection: Connection

    private init(socketPath: String, connection: Connection, daemonVersion: String) {
        self.socketPath = socketPath
        self.connection = connection
        self.daemonVersion = daemonVersion
    }

    deinit {
        connection.close()
    }

    /// Connects and performs the version handshake.
    ///
    /// - Parameters:
    ///   - socketPath: the daemon's control socket.
    ///   - clientName: a name shown in the daemon's status, for diagnostics.
    public static func connect(socketPath: String, clientName: String = ProcessInfo.processInfo.processName) async throws(ShmBrokerClientError) -> ShmBrokerClient {
        let socket: FileDescriptor
        do {
            socket = try SeqpacketSocket.connect(path: socketPath)
        } catch let error as Errno {
            throw .connectionFailed(socketPath: socketPath, reason: "\(error)")
        } catch {
            throw .connectionFailed(socketPath: socketPath, reason: "\(error)")
        }
        ProcessSignals.ignoreBrokenPipe()
        let connection = Connection(socket: socket)
        connection.startReceiving()
        let reply = try await connection.request(.hello(protocolVersion: ControlProtocol.version, clientName: clientName))
        guard case let .helloOK(version, _, daemonVersion) = reply.message, version == ControlProtocol.version else {
            connection.close()
            throw .protocolViolation("unexpected handshake reply \(reply.message.type)")
        }
        return ShmBrokerClient(socketPath: socketPath, connection: connection, daemonVersion: daemonVersion)
    }

    /// Opens a segment for reading: receives a read-only descriptor and maps it.
    ///
    /// - Parameter name: the segment's name from the daemon's config.
    /// - Returns: a handle whose reads go straight to shared memory, with no further requests.
    public func open(_ name: String) async throws(ShmBrokerClientError) -> SegmentHandle {
        let reply = try await connection.request(.open(segment: name))
        guard case .opened(let info) = reply.message, let descriptor = reply.descriptors.first else {
            reply.descriptors.forEach { $0.closeQuietly() }
            throw .protocolViolation("OPEN reply carried no segment descriptor")
        }
        defer { reply.descriptors.forEach { $0.closeQuietly() } }
        let region: MappedRegion
        do {
            region = try MappedRegion(mapping: descriptor, length: Int(info.mappingSize), writable: false)
        } catch {
            throw .system(operation: "mmap of segment \(name)", errno: error)
        }
        do {
            return SegmentHandle(name: name, reader: try SegmentReader(region: region))
        } catch {
            throw .segment(error)
        }
    }

    /// Publishes `bytes` as the segment's next version. Small payloads travel inline; larger ones
    /// in a memfd attached to the request, so any size up to the segment's capacity works.
    ///
    /// - Throws: ``ShmBrokerClientError/refused(_:)`` with `payload-too-large` if it exceeds the
    ///   capacity (nothing is written), or `permission-denied` for a uid not allowed to publish.
    /// - Returns: the new version and its CRC-64.
    @discardableResult
    public func publish(_ name: String, bytes: [UInt8]) async throws(ShmBrokerClientError) -> VersionInfo {
        let reply: Connection.Reply
        if bytes.count <= ControlProtocol.maximumInlinePayload(nameLength: name.utf8.count) {
            reply = try await connection.request(.publish(segment: name, payload: .inline(bytes)))
        } else {
            let file: FileDescriptor
            do {
                file = try bytes.withUnsafeBytes { buffer throws(Errno) in
                    try MemoryFile.create(name: "shmbroker-publish:\(name)", contents: buffer)
                }
            } catch let error as Errno {
                throw .system(operation: "memfd for payload", errno: error)
            } catch {
                throw .protocolViolation("\(error)")
            }
            defer { file.closeQuietly() }
            reply = try await connection.request(.publish(segment: name, payload: .attachedFile(length: UInt64(bytes.count))),
                                                 descriptors: [file])
        }
        guard case .published(let info) = reply.message else {
            throw .protocolViolation("unexpected reply \(reply.message.type) to PUBLISH")
        }
        return info
    }

    /// Subscribes to a segment's version events.
    ///
    /// Events are coalesced for a slow consumer: it may skip versions but always learns the
    /// latest one. The sequence ends when the connection closes or the segment is retired.
    /// - Returns: the subscription, starting with the version current at subscription time.
    public func subscribe(_ name: String) async throws(ShmBrokerClientError) -> Subscription {
        let (stream, continuation) = AsyncStream<SegmentEvent>.makeStream(bufferingPolicy: .bufferingNewest(64))
        connection.addSubscriber(name, continuation)
        let reply: Connection.Reply
        do {
            reply = try await connection.request(.subscribe(segment: name))
        } catch {
            connection.removeSubscriber(name)
            throw error
        }
        guard case .subscribed(let latest) = reply.message else {
            connection.removeSubscriber(name)
            throw .protocolViolation("unexpected reply \(reply.message.type) to SUBSCRIBE")
        }
        return Subscription(segment: name, initialVersion: latest, events: stream)
    }

    /// Stops version events for a segment; its subscription's sequence ends.
    public func unsubscribe(_ name: String) async throws(ShmBrokerClientError) {
        _ = try await connection.request(.unsubscribe(segment: name))
        connection.removeSubscriber(name)
    }

    /// The daemon's status: segments, clients, counters.
    public func status() async throws(ShmBrokerClientError) -> StatusReport {
        let json = try await statusJSON()
        do {
            return try StatusReport.decode(json)
        } catch {
            throw .protocolViolation("status is not valid JSON: \(error)")
        }
    }

    /// The daemon's status as the JSON text it sent.
    public func statusJSON() async throws(ShmBrokerClientError) -> [UInt8] {
        let reply = try await connection.request(.status)
        guard case .statusReport(let json) = reply.message else {
            throw .protocolViolation("unexpected reply \(reply.message.type) to STATUS")
        }
        return json
    }

    /// Closes the connection. Mapped segments stay readable; subscriptions end.
    public func close() {
        connection.close()
    }
}

/// An event on a subscribed segment.
public enum SegmentEvent: Sendable, Equatable {
    /// A new version exists (possibly several; this is the latest when the daemon sent it).
    case version(VersionInfo)
    /// The segment was removed from the daemon's config.
    case retired
}

/// A stream of version events for one segment.
public struct Subscription: AsyncSequence, Sendable {
    public typealias Element = SegmentEvent
    /// The segment's name.
    public let segment: String
    /// The latest version when the subscription began (0: never published).
    public let initialVersion: UInt64
    let events: AsyncStream<SegmentEvent>

    public func makeAsyncIterator() -> AsyncStream<SegmentEvent>.Iterator {
        events.makeAsyncIterator()
    }
}
