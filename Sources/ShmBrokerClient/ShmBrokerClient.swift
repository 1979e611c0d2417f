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
    /// How the client behaves when the daemon goes away.
    public struct Options: Sendable {
        /// Reconnect automatically after the daemon closes the connection (a restart, say), and
        /// resubscribe every subscription; requests issued meanwhile wait for the new connection,
        /// up to ``requestWaitForReconnectionNanoseconds``.
        public var reconnects = true
        /// Longest pause between two reconnection attempts.
        public var maximumReconnectDelayNanoseconds: UInt64 = 1_000_000_000
        /// How long a request made while reconnecting waits for the new connection before it
        /// fails with ``ShmBrokerClientError/disconnected`` (default 30 s: a restart under systemd
        /// takes well under a second; a daemon that stays away must not hang its callers).
        /// Subscriptions keep reconnecting regardless; nil waits indefinitely.
        public var requestWaitForReconnectionNanoseconds: UInt64? = 30_000_000_000

        public init(reconnects: Bool = true, requestWaitForReconnectionNanoseconds: UInt64? = 30_000_000_000) {
            self.reconnects = reconnects
            self.requestWaitForReconnectionNanoseconds = requestWaitForReconnectionNanoseconds
        }
    }

    /// The path this client connects to.
    public let socketPath: String
    /// The name the daemon shows for this client.
    public let clientName: String
    public let options: Options

    private struct WeakPublisher {
        weak var publisher: SegmentPublisher?
        /// Which publisher this entry is for, even after it was deallocated.
        let serialNumber: UInt64
    }

    private struct SubscriptionEntry {
        var continuation: AsyncStream<SegmentEvent>.Continuation
        var lastVersion: UInt64
    }

    private struct State {
        /// Memfds that carried earlier large payloads, kept mapped so the next one reuses their
        /// pages instead of allocating (and zeroing) fresh memory for every publish.
        var stagingFiles: [StagingFile] = []
        var connection: Connection?
        var daemonVersion = ""
        var subscriptions: [String: SubscriptionEntry] = [:]
        /// Open publishers, by segment, to re-attach after a reconnection.
        var publishers: [String: WeakPublisher] = [:]
        /// Requests waiting for a reconnection, by a number that lets a timeout find its own.
        var waitingForConnection: [UInt64: CheckedContinuation<Connection, any Error>] = [:]
        var nextWaiterID: UInt64 = 0
        var reconnecting = false
        var closed = false
    }

    private let state = Mutex(State())

    private init(socketPath: String, clientName: String, options: Options) {
        self.socketPath = socketPath
        self.clientName = clientName
        self.options = options
    }

    deinit {
        close()
    }

    /// Connects and performs the version handshake.
    ///
    /// - Parameters:
    ///   - socketPath: the daemon's control socket.
    ///   - clientName: a name shown in the daemon's status, for diagnostics.
    ///   - options: reconnection behaviour.
    public static func connect(socketPath: String, clientName: String = ProcessInfo.processInfo.processName,
                               options: Options = Options()) async throws(ShmBrokerClientError) -> ShmBrokerClient {
        ProcessSignals.ignoreBrokenPipe()
        let client = ShmBrokerClient(socketPath: socketPath, clientName: clientName, options: options)
        let (connection, version) = try await client.establish()
        client.state.withLock {
            $0.connection = connection
            $0.daemonVersion = version
        }
        return client
    }

    /// The daemon's version, from the latest handshake.
    public var daemonVersion: String { state.withLock { $0.daemonVersion } }

    /// Opens a socket and performs HELLO.
    private func establish() async throws(ShmBrokerClientError) -> (Connection, String) {
        let socket: FileDescriptor
        do {
            socket = try SeqpacketSocket.connect(path: socketPath)
        } catch {
            throw .connectionFailed(socketPath: socketPath, reason: "\(error)")
        }
        let connection = Connection(
            socket: socket,
            onEvent: { [weak self] message in self?.deliver(message) },
            onClose: { [weak self] lost in self?.connectionLost(lost) })
        connection.startReceiving()
        let reply = try await connection.request(.hello(protocolVersion: ControlProtocol.version, clientName: clientName))
        guard case let .helloOK(version, _, daemonVersion) = reply.message, version == ControlProtocol.version else {
            connection.close()
            throw .protocolViolation("unexpected handshake reply \(reply.message.type)")
        }
        return (connection, daemonVersion)
    }

    /// The live connection, waiting for a reconnection in progress.
    private nonisolated(nonsending) func currentConnection() async throws(ShmBrokerClientError) -> Connection {
        if let ready = state.withLock({ $0.closed ? nil : $0.connection }) { return ready }
        let limit = options.requestWaitForReconnectionNanoseconds
        do {
            return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Connection, any Error>) in
                let outcome: Result<Connection, ShmBrokerClientError>? = state.withLock { state in
                    if state.closed || (!state.reconnecting && state.connection == nil) { return .failure(.disconnected) }
                    if let connection = state.connection { return .success(connection) }
                    let id = state.nextWaiterID
                    state.nextWaiterID += 1
                    state.waitingForConnection[id] = continuation
                    if let limit {
                        // Fails this request if no connection came in time (and it is still waiting).
                        Task.detached { [weak self] in
                            try? await Task.sleep(nanoseconds: limit)
                            self?.state.withLock { $0.waitingForConnection.removeValue(forKey: id) }?
                                .resume(throwing: ShmBrokerClientError.disconnected)
                        }
                    }
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } catch let error as ShmBrokerClientError {
            throw error
        } catch {
            throw .disconnected
        }
    }

    private nonisolated(nonsending) func request(_ request: Request, descriptors: [FileDescriptor] = []) async throws(ShmBrokerClientError) -> Connection.Reply {
        try await currentConnection().request(request, descriptors: descriptors)
    }

    /// Routes an event to its subscription; versions older than one already announced are dropped.
    private func deliver(_ message: ServerMessage) {
        switch message {
        case let .versionEvent(segment, info):
            let continuation: AsyncStream<SegmentEvent>.Continuation? = state.withLock { state in
                guard var entry = state.subscriptions[segment], info.version > entry.lastVersion else { return nil }
                entry.lastVersion = info.version
                state.subscriptions[segment] = entry
                return entry.continuation
            }
            continuation?.yield(.version(info))
        case .retiredEvent(let segment):
            if let entry = state.withLock({ $0.subscriptions.removeValue(forKey: segment) }) {
                entry.continuation.yield(.retired)
                entry.continuation.finish()
            }
        case let .stalenessEvent(segment, stale, _):
            state.withLock { $0.subscriptions[segment]?.continuation }?.yield(stale ? .stale : .fresh)
        default:
            break
        }
    }

    /// The connection is gone: reconnect (and resubscribe) unless the client was closed.
    private func connectionLost(_ lost: Connection) {
        let shouldReconnect = state.withLock { state -> Bool in
            guard state.connection === lost || state.connection == nil else { return false }
            state.connection = nil
            // Producers waiting on a ring the daemon no longer consumes wake and fail.
            for entry in state.publishers.values {
                entry.publisher?.ring.detachLocally(code: UInt32(ErrorCode.connectionLost.rawValue))
            }
            guard !state.closed, options.reconnects, !state.reconnecting else { return false }
            state.reconnecting = true
            return true
        }
        guard shouldReconnect else {
            if !options.reconnects { finishEverything() }
            return
        }
        // The task holds the client only while attempting, so a client dropped by its owner
        // during a long outage is freed (and stops trying).
        Task.detached { [weak self] in
            var delay: UInt64 = 20_000_000
            while true {
                let maximumDelay: UInt64
                do {
                    guard let client = self, !client.state.withLock({ $0.closed }) else { return }
                    if await client.attemptReconnection() { return }
                    maximumDelay = client.options.maximumReconnectDelayNanoseconds
                }
                try? await Task.sleep(nanoseconds: delay)
                delay = min(delay * 2, maximumDelay)
            }
        }
    }

    /// One reconnection attempt: connect, handshake, resubscribe, then release waiting requests.
    private func attemptReconnection() async -> Bool {
        do {
            let (connection, version) = try await establish()
            try await resubscribe(on: connection)
            await reattachPublishers(on: connection)
            let waiters = state.withLock { state in
                state.connection = connection
                state.daemonVersion = version
                state.reconnecting = false
                defer { state.waitingForConnection.removeAll() }
                return state.waitingForConnection
            }
            waiters.values.forEach { $0.resume(returning: connection) }
            return true
        } catch {
            return false
        }
    }

    /// Re-creates every subscription on a new connection, announcing the current version if it
    /// differs from the last one the subscriber heard of (newer after a restart with the fd store;
    /// possibly lower after a restart without it, when segments start afresh).
    private func resubscribe(on connection: Connection) async throws(ShmBrokerClientError) {
        for segment in state.withLock({ Array($0.subscriptions.keys) }) {
            // While resynchronising, accept any event: versions may have restarted from 1.
            let previous = state.withLock { state -> UInt64 in
                let previous = state.subscriptions[segment]?.lastVersion ?? 0
                state.subscriptions[segment]?.lastVersion = 0
                return previous
            }
            let latest: PublishReceipt
            do throws(ShmBrokerClientError) {
                let reply = try await connection.request(.subscribe(segment: segment))
                guard case .subscribed(let info) = reply.message else {
                    throw .protocolViolation("unexpected reply \(reply.message.type) to SUBSCRIBE")
                }
                latest = info
            } catch {
                guard case .refused = error else { throw error }
                // Gone from the new daemon's config (or no longer permitted): the subscription ends.
                deliver(.retiredEvent(segment: segment))
                continue
            }
            let announce: AsyncStream<SegmentEvent>.Continuation? = state.withLock { state in
                guard var entry = state.subscriptions[segment] else { return nil }
                defer { state.subscriptions[segment] = entry }
                if entry.lastVersion > 0 {
                    entry.lastVersion = max(entry.lastVersion, latest.version)  // events already arrived
                    return nil
                }
                entry.lastVersion = latest.version
                return latest.version != previous && latest.version > 0 ? entry.continuation : nil
            }
            announce?.yield(.version(latest))
        }
    }

    private func finishEverything() {
        let (subscriptions, waiters) = state.withLock { state in
            defer {
                state.subscriptions.removeAll()
                state.waitingForConnection.removeAll()
            }
            return (state.subscriptions, state.waitingForConnection)
        }
        subscriptions.values.forEach { $0.continuation.finish() }
        waiters.values.forEach { $0.resume(throwing: ShmBrokerClientError.disconnected) }
    }

    /// Opens a publish ring to a segment: the fast path for a producer that publishes often.
    ///
    /// - Parameter name: the segment's name; the daemon's config must let this uid publish to it.
    /// - Returns: a publisher whose ``SegmentPublisher/publish(_:timeoutNanoseconds:)-(UnsafeRawBufferPointer,_)`` appends to
    ///   shared memory without a request per version.
    /// - Throws: `refused` with `permission-denied`, `no-such-segment` or `invalid-ring` (a
    ///   publisher for this segment is already open on this client).
    public nonisolated(nonsending) func openPublisher(_ name: String) async throws(ShmBrokerClientError) -> SegmentPublisher {
        // The ring is sized from the segment's capacity, which the first ATTACH_RING reports: a
        // small ring first, replaced once if the segment needs a larger one.
        var capacity = 64 << 10
        for attempt in 0..<2 {
            let (ring, file, doorbell) = try SegmentPublisher.makeRing(capacity: capacity)
            let segmentCapacity: Int
            do throws(ShmBrokerClientError) {
                let reply = try await request(.attachRing(segment: name), descriptors: [file, doorbell.descriptor])
                guard case .ringAttached(let reported, _) = reply.message else {
                    throw .protocolViolation("unexpected reply \(reply.message.type) to ATTACH_RING")
                }
                segmentCapacity = Int(clamping: reported)
                if segmentCapacity > ring.maximumPayload && attempt == 0 {
                    _ = try await request(.detachRing(segment: name))
                    file.closeQuietly()
                    doorbell.close()
                    capacity = segmentCapacity
                    continue
                }
            } catch {
                file.closeQuietly()
                doorbell.close()
                throw error
            }
            let publisher = SegmentPublisher(segment: name, capacity: min(segmentCapacity, ring.maximumPayload), ring: ring,
                                             ringFile: file, doorbell: doorbell) { [weak self] segment, serialNumber in
                await self?.detachPublisher(of: segment, serialNumber: serialNumber)
            }
            state.withLock { $0.publishers[name] = WeakPublisher(publisher: publisher, serialNumber: publisher.serialNumber) }
            return publisher
        }
        throw .protocolViolation("the daemon kept reporting a capacity the ring cannot hold")
    }

    /// Detaches the ring of a publisher that was closed or dropped (the daemon first publishes
    /// what is left in it).
    private nonisolated(nonsending) func detachPublisher(of segment: String, serialNumber: UInt64) async {
        let current = state.withLock { state -> Bool in
            guard state.publishers[segment]?.serialNumber == serialNumber else { return false }  // a newer one
            state.publishers.removeValue(forKey: segment)
            return true
        }
        if current { _ = try? await request(.detachRing(segment: segment)) }
    }

    /// Attaches every open publisher's ring to a new connection; the new daemon continues where
    /// the old one stopped consuming. A ring the new daemon refuses stays detached with its reason.
    private func reattachPublishers(on connection: Connection) async {
        let publishers = state.withLock { $0.publishers.values.compactMap(\.publisher) }
        for publisher in publishers {
            publisher.ring.prepareForReattaching()
            do {
                _ = try await connection.request(.attachRing(segment: publisher.segment),
                                                 descriptors: [publisher.ringFile, publisher.doorbell.descriptor])
            } catch {
                let code = error.code ?? .connectionLost
                publisher.ring.detachLocally(code: UInt32(code.rawValue))
            }
        }
    }

    /// Opens a segment for reading: receives a read-only descriptor and maps it.
    ///
    /// - Parameter name: the segment's name from the daemon's config.
    /// - Returns: a handle whose reads go straight to shared memory, with no further requests.
    public nonisolated(nonsending) func open(_ name: String) async throws(ShmBrokerClientError) -> SegmentHandle {
        let reply = try await request(.open(segment: name))
        guard case .opened(let info) = reply.message, let descriptor = reply.descriptors.first else {
            reply.descriptors.forEach { $0.closeQuietly() }
            throw .protocolViolation("OPEN reply carried no segment descriptor")
        }
        defer { reply.descriptors.forEach { $0.closeQuietly() } }
        // Nothing the owner sent is trusted before it is checked: a descriptor shorter than the
        // mapping it announced, or one it could still shrink, would kill this process with SIGBUS.
        guard info.mappingSize >= UInt64(SegmentLayout.headerSize), info.mappingSize <= UInt64(Int.max / 2) else {
            throw .protocolViolation("OPENED for \(name) announced a mapping of \(info.mappingSize) bytes")
        }
        do {
            try MemoryFile.checkMappable(descriptor, length: Int(info.mappingSize))
            if reply.descriptors.count >= 2 {
                try MemoryFile.checkMappable(reply.descriptors[1], length: SegmentLayout.WaitBoard.size)
            }
        } catch {
            throw .protocolViolation("OPENED for \(name): a descriptor cannot be mapped safely: \(error)")
        }
        let region: MappedRegion
        do {
            region = try MappedRegion(mapping: descriptor, length: Int(info.mappingSize), writable: false)
        } catch {
            throw .system(operation: "mmap of segment \(name)", errno: error)
        }
        // The wait board (second descriptor): this process counts its sleeping threads there.
        var board: MappedRegion?
        if reply.descriptors.count >= 2 {
            do {
                board = try MappedRegion(mapping: reply.descriptors[1], length: SegmentLayout.WaitBoard.size, writable: true)
            } catch {
                throw .system(operation: "mmap of the wait board of \(name)", errno: error)
            }
        }
        do {
            return SegmentHandle(name: name, reader: try SegmentReader(region: region, board: board))
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
    public nonisolated(nonsending) func publish(_ name: String, bytes: [UInt8]) async throws(ShmBrokerClientError) -> PublishReceipt {
        let reply: Connection.Reply
        if bytes.count <= ControlProtocol.maximumInlinePayload(nameLength: name.utf8.count) {
            reply = try await request(.publish(segment: name, payload: .inline(bytes)))
        } else {
            let file = try stagingFile(holding: bytes)
            do {
                reply = try await request(.publish(segment: name, payload: .attachedFile(length: UInt64(bytes.count))),
                                          descriptors: [file.descriptor])
            } catch {
                // A refusal is a reply: the daemon is done with the file. After a lost connection
                // it may not be, so the file is never reused then.
                if case .refused = error { releaseStagingFile(file) } else { file.close() }
                throw error
            }
            releaseStagingFile(file)
        }
        guard case .published(let info) = reply.message else {
            throw .protocolViolation("unexpected reply \(reply.message.type) to PUBLISH")
        }
        return info
    }

    /// Publishes the bytes of a plain value (`BitwiseCopyable`) as the segment's next version;
    /// readers get it back with ``SegmentHandle/read(_:)``.
    @discardableResult
    public nonisolated(nonsending) func publish<Value: BitwiseCopyable>(_ name: String, value: Value) async throws(ShmBrokerClientError) -> PublishReceipt {
        var copy = value
        let bytes = withUnsafeBytes(of: &copy) { Array($0) }
        return try await publish(name, bytes: bytes)
    }

    /// A staging file holding `bytes` from offset 0, reused from earlier publishes when possible
    /// (up to four are kept, each as large as the largest payload it carried).
    private func stagingFile(holding bytes: [UInt8]) throws(ShmBrokerClientError) -> StagingFile {
        let file: StagingFile
        if let reused = state.withLock({ $0.stagingFiles.popLast() }) {
            file = reused
        } else {
            do {
                file = try StagingFile()
            } catch {
                throw .system(operation: "memfd for payload", errno: error)
            }
        }
        let stored = bytes.withUnsafeBytes { buffer in Result { () throws(Errno) in try file.store(buffer) } }
        if case .failure(let error) = stored {
            file.close()
            throw .system(operation: "staging the payload in a memfd", errno: error)
        }
        return file
    }

    private func releaseStagingFile(_ file: StagingFile) {
        let kept = state.withLock { state -> Bool in
            guard !state.closed, state.stagingFiles.count < 4 else { return false }
            state.stagingFiles.append(file)
            return true
        }
        if !kept { file.close() }
    }

    /// Subscribes to a segment's version events.
    ///
    /// Events are coalesced for a slow consumer: it may skip versions but always learns the
    /// latest one. If the daemon restarts, the client reconnects and resubscribes by itself and
    /// announces any version published meanwhile. The sequence ends when the client is closed,
    /// the segment is retired, or (with reconnection off) the connection drops.
    /// - Returns: the subscription, starting with the version current at subscription time.
    public func subscribe(_ name: String) async throws(ShmBrokerClientError) -> Subscription {
        let (stream, continuation) = AsyncStream<SegmentEvent>.makeStream(bufferingPolicy: .bufferingNewest(64))
        let previous = state.withLock { state in
            let previous = state.subscriptions[name]
            state.subscriptions[name] = SubscriptionEntry(continuation: continuation, lastVersion: 0)
            return previous
        }
        previous?.continuation.finish()
        let reply: Connection.Reply
        do {
            reply = try await request(.subscribe(segment: name))
        } catch {
            removeSubscription(name)
            throw error
        }
        guard case .subscribed(let latest) = reply.message else {
            removeSubscription(name)
            throw .protocolViolation("unexpected reply \(reply.message.type) to SUBSCRIBE")
        }
        // Events (all newer than `latest`) may have been delivered already; keep the newest.
        state.withLock { state in
            guard var entry = state.subscriptions[name] else { return }
            entry.lastVersion = max(entry.lastVersion, latest.version)
            state.subscriptions[name] = entry
        }
        return Subscription(segment: name, initialVersion: latest.version, events: stream)
    }

    private func removeSubscription(_ name: String) {
        state.withLock { $0.subscriptions.removeValue(forKey: name) }?.continuation.finish()
    }

    /// Stops version events for a segment; its subscription's sequence ends.
    public nonisolated(nonsending) func unsubscribe(_ name: String) async throws(ShmBrokerClientError) {
        _ = try await request(.unsubscribe(segment: name))
        removeSubscription(name)
    }

    /// The daemon's status: segments, clients, counters.
    public nonisolated(nonsending) func status() async throws(ShmBrokerClientError) -> StatusReport {
        let json = try await statusJSON()
        do {
            return try StatusReport.decode(json)
        } catch {
            throw .protocolViolation("status is not valid JSON: \(error)")
        }
    }

    /// The daemon's status as the JSON text it sent.
    public nonisolated(nonsending) func statusJSON() async throws(ShmBrokerClientError) -> [UInt8] {
        let reply = try await request(.status)
        defer { reply.descriptors.forEach { $0.closeQuietly() } }
        switch reply.message {
        case .statusReport(let json):
            return json
        case .statusReportFile(let length):
            return try Self.contents(of: reply.descriptors.first, length: length, what: "status report")
        default:
            throw .protocolViolation("unexpected reply \(reply.message.type) to STATUS")
        }
    }

    /// The owner's metrics in the Prometheus text format, under the same access rules as STATUS
    /// (a segment's series only for peers that may read it).
    public nonisolated(nonsending) func metrics() async throws(ShmBrokerClientError) -> String {
        let reply = try await request(.metrics)
        defer { reply.descriptors.forEach { $0.closeQuietly() } }
        switch reply.message {
        case .metricsReport(let text):
            return String(decoding: text, as: UTF8.self)
        case .metricsReportFile(let length):
            return String(decoding: try Self.contents(of: reply.descriptors.first, length: length, what: "metrics"), as: UTF8.self)
        default:
            throw .protocolViolation("unexpected reply \(reply.message.type) to METRICS")
        }
    }

    /// The first `length` bytes of a report sent as a descriptor.
    private static func contents(of file: FileDescriptor?, length: UInt64, what: String) throws(ShmBrokerClientError) -> [UInt8] {
        guard let file else { throw .protocolViolation("a \(what) file without a descriptor") }
        // A length larger than the file is refused before anything is allocated for it.
        guard let size = try? file.fileSize(), length <= UInt64(size), length <= 1 << 30 else {
            throw .protocolViolation("the \(what) file is shorter than the \(length) bytes announced")
        }
        var bytes = [UInt8](repeating: 0, count: Int(length))
        let read = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(Errno) in try file.readFully(into: buffer, atOffset: 0) }
        }
        guard case .success(let count) = read, count == Int(length) else {
            throw .protocolViolation("the \(what) file is shorter than announced")
        }
        return bytes
    }

    /// Closes the connection. Mapped segments stay readable; subscriptions end.
    public func close() {
        let (connection, staging) = state.withLock { state in
            state.closed = true
            defer { state.stagingFiles.removeAll() }
            return (state.connection, state.stagingFiles)
        }
        staging.forEach { $0.close() }
        connection?.close()
        finishEverything()
    }
}

/// An event on a subscribed segment.
public enum SegmentEvent: Sendable, Equatable {
    /// A new version exists (possibly several; this is the latest when the daemon sent it).
    case version(PublishReceipt)
    /// The segment was removed from the daemon's config.
    case retired
    /// A mirrored segment's source went quiet (`docs/MIRROR.md`): the latest version stays
    /// readable but may be behind the source's.
    case stale
    /// A mirrored segment that was stale is current again.
    case fresh
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
