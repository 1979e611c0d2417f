import Foundation
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// A reply to one request: its message, the descriptors that travel with it (closed once sent),
/// and work to do once it is on its way (a publish ring's first drain).
struct Reply {
    var message: ServerMessage
    var descriptors: [FileDescriptor] = []
    var afterSending: (() -> Void)?
}

/// What the router answers: a reply, or the error the client is told.
enum Response {
    case reply(Reply)
    case refusal(ProtocolError)
}

/// The descriptors a request carried. A handler takes the ones it keeps or uses; the router
/// closes whatever is left, whether the handler succeeded or not.
final class ReceivedDescriptors {
    private var items: [FileDescriptor?]

    init(_ descriptors: [FileDescriptor]) { items = descriptors }

    /// The descriptor at `index`, now the caller's to close (nil if taken already or absent).
    func take(_ index: Int) -> FileDescriptor? {
        guard items.indices.contains(index) else { return nil }
        defer { items[index] = nil }
        return items[index]
    }

    func closeRest() {
        for case let descriptor? in items { descriptor.closeQuietly() }
        items = items.map { _ in nil }
    }
}

/// The request router: one decoded request from one client in, its reply out. Nothing here
/// reads from or writes to a socket, so every request and error can be tested without one
/// (`RouterTests`); `handleFrame` decodes, checks the frame and sends what this answers. Who may
/// do what is decided in one place, ``lookUp(_:for:publishing:)``.
extension BrokerServer {
    func respond(to request: Request, descriptors: ReceivedDescriptors, from client: ClientConnection) -> Response {
        loop.assertOnLoop()
        do throws(ProtocolError) {
            return .reply(try route(request, descriptors: descriptors, from: client))
        } catch {
            return .refusal(error)
        }
    }

    private func route(_ request: Request, descriptors: ReceivedDescriptors, from client: ClientConnection) throws(ProtocolError) -> Reply {
        switch request {
        case let .hello(version, name):
            guard version == ControlProtocol.version else {
                throw ProtocolError(.unsupportedProtocolVersion,
                    "protocol version \(version) is not supported; this daemon speaks version \(ControlProtocol.version)")
            }
            client.greeted = true
            client.name = String(name.prefix(128))
            return Reply(message: .helloOK(protocolVersion: ControlProtocol.version, maximumFrameSize: UInt32(ControlProtocol.maximumFrameSize),
                                           daemonVersion: "\(identity.name) \(Self.version)"))
        case .open(let name):
            return try open(try lookUp(name, for: client, publishing: false), for: client)
        case .subscribe(let name):
            let segment = try lookUp(name, for: client, publishing: false)
            segment.subscribers.insert(client.id)
            client.subscriptions.insert(name)
            let latest = segment.writer.latestReceipt ?? PublishReceipt(version: 0, length: 0, crc64: 0, publishedAtNanoseconds: 0)
            client.subscribedAt[name] = latest.version
            return Reply(message: .subscribed(latest))
        case .unsubscribe(let name):
            guard client.subscriptions.remove(name) != nil else {
                throw ProtocolError(.notSubscribed, "not subscribed to \"\(name)\"")
            }
            segments[name]?.subscribers.remove(client.id)
            client.subscribedAt.removeValue(forKey: name)
            client.removePending(name)
            return Reply(message: .ok)
        case let .publish(name, payload):
            let segment = try lookUp(name, for: client, publishing: true)
            let receipt: PublishReceipt
            switch payload {
            case .inline(let bytes):
                receipt = try pipeline.commit(to: segment, origin: .request) { try $0.publish(bytes) }
            case .attachedFile(let length):
                guard let file = descriptors.take(0) else { throw ProtocolError(.missingDescriptor, "PUBLISH carried no file") }
                defer { file.closeQuietly() }
                receipt = try publish(from: file, length: length, into: segment, client: client)
            }
            return Reply(message: .published(receipt))
        case .status:
            return try statusReply(for: client.credentials)
        case .metrics:
            return try metricsReply(for: client.credentials)
        case .attachRing(let name):
            let segment = try lookUp(name, for: client, publishing: true)
            guard let file = descriptors.take(0), let doorbell = descriptors.take(1) else {
                throw ProtocolError(.missingDescriptor, "ATTACH_RING carried no ring or doorbell")
            }
            return try attachRing(file: file, doorbell: doorbell, to: segment, for: client)
        case .detachRing(let name):
            return try detachRing(name, for: client)
        }
    }

    /// The segment `name` if `client` may use it so, else the error it is told. The access policy
    /// lives here: a segment the peer may neither read nor publish to is answered exactly like one
    /// that does not exist, as STATUS hides it; one it may see but not use this way is
    /// `permission-denied`; one its owner process publishes refuses other publishers.
    func lookUp(_ name: String, for client: ClientConnection, publishing: Bool) throws(ProtocolError) -> ManagedSegment {
        guard BrokerConfiguration.isValidSegmentName(name) else {
            throw ProtocolError(.invalidSegmentName, "\"\(name.prefix(80))\" is not a valid segment name (1 to 64 letters, digits, '.', '_' or '-')")
        }
        let peer = client.credentials
        guard let segment = segments[name], isPrivileged(peer) || mayRead(segment, peer)
                || segment.definition.publishers.allows(peer, daemonUID: daemonUID) else {
            if segments[name] != nil { logAccessDenied(name, client: client, publishing: publishing, answered: .noSuchSegment) }
            throw ProtocolError(.noSuchSegment,
                isPrivileged(peer) ? "no segment named \"\(name)\"" : "no segment named \"\(name)\" that uid \(peer.uid) may use")
        }
        if publishing, segment.owner != nil {
            throw ProtocolError(.ownerPublishes,
                "segment \"\(name)\" is published by its owner process (pid \(CurrentProcess.processID)) itself; a segment has one writer, so clients may read it but not publish")
        }
        let access = publishing ? segment.definition.publishers : segment.definition.readers
        guard access.allows(peer, daemonUID: daemonUID) else {
            logAccessDenied(name, client: client, publishing: publishing, answered: .permissionDenied)
            throw ProtocolError(.permissionDenied, "uid \(peer.uid) may not \(publishing ? "publish to" : "read") segment \"\(name)\"")
        }
        return segment
    }

    /// Logs a refusal for the administrator (the journal is not the peer's to read), with the
    /// code the peer was answered.
    func logAccessDenied(_ name: String, client: ClientConnection, publishing: Bool, answered: ErrorCode) {
        logger.notice("access denied", metadata: [
            "segment": "\(name)", "uid": "\(client.credentials.uid)", "pid": "\(client.credentials.pid)",
            "operation": "\(publishing ? "publish" : "read")", "code": "\(answered.name)",
        ])
    }

    /// OPENED: the segment's read-only descriptor and its wait board.
    private func open(_ segment: ManagedSegment, for client: ClientConnection) throws(ProtocolError) -> Reply {
        let descriptor: FileDescriptor
        do {
            descriptor = try segment.readOnlyDescriptor()
        } catch {
            throw descriptorFailure(error, "cannot open a read-only descriptor")
        }
        let board: FileDescriptor
        do {
            board = try segment.boardDescriptor()
        } catch {
            descriptor.closeQuietly()
            throw descriptorFailure(error, "cannot duplicate the wait board")
        }
        let layout = segment.writer.layout
        segment.readers.insert(client.id)
        client.opened.insert(segment.name)
        return Reply(message: .opened(OpenedSegment(
            capacity: UInt64(layout.capacity), slotCount: UInt32(layout.slotCount), layoutVersion: SegmentLayout.layoutVersion,
            mappingSize: UInt64(layout.totalSize), latestVersion: segment.writer.latestVersion)), descriptors: [descriptor, board])
    }

    /// The reply for a descriptor the daemon could not make: `descriptor-limit` when it is out of
    /// descriptors (the client did nothing wrong and may retry), else `internal-error`.
    func descriptorFailure(_ error: any Error, _ what: String) -> ProtocolError {
        if let errno = error as? Errno, errno == .tooManyOpenFiles || errno == .tooManyOpenFilesInSystem {
            counters.descriptorLimitRefusals += 1
            let limit = ResourceLimits.openFiles().current.map(String.init) ?? "unlimited"
            return ProtocolError(.descriptorLimit,
                "\(what): the daemon has reached its limit of \(limit) open files (RLIMIT_NOFILE); retry later")
        }
        return ProtocolError(.internalError, "\(what): \(error)")
    }

    /// STATUS shows each peer only what it may see: segments whose `readers` list admits it (a
    /// segment it may not read is left out, so its version, length, CRC and timing stay secret),
    /// and clients only to root and the daemon's user — everyone else sees its own uid's
    /// connections. Counters are daemon-wide totals for root and the daemon's user.
    private func statusReply(for peer: PeerCredentials) throws(ProtocolError) -> Reply {
        let privileged = isPrivileged(peer)
        let report = StatusReport(
            daemon: StatusReport.Daemon(name: identity.name, version: Self.version, pid: CurrentProcess.processID,
                                        startedAt: identity.startedAt.timeIntervalSince1970, configPath: identity.configPath,
                                        socketPath: configuration.socket.path, protocolVersion: ControlProtocol.version),
            segments: segments.ordered.filter { mayRead($0, peer) }.map { segment in
                let receipt = segment.writer.latestReceipt
                return StatusReport.Segment(
                    name: segment.name, capacity: UInt64(segment.definition.capacity), slots: UInt32(segment.definition.slots),
                    mappingSize: UInt64(segment.writer.layout.totalSize), version: receipt?.version ?? 0,
                    length: UInt64(receipt?.length ?? 0), crc64: String(format: "%016llx", receipt?.crc64 ?? 0),
                    lastPublishedAt: receipt.map { Double($0.publishedAtNanoseconds) / 1e9 },
                    readers: segment.readers.count, subscribers: segment.subscribers.count,
                    mirror: segment.mirror?.report(localVersion: receipt?.version ?? 0, now: Date()))
            },
            clients: clients.values.filter { !$0.isClosing && (privileged || $0.credentials.uid == peer.uid) }.sorted { $0.id < $1.id }.map {
                StatusReport.Client(id: $0.id, name: $0.name, pid: $0.credentials.pid, uid: $0.credentials.uid,
                                    gid: $0.credentials.gid, opened: $0.opened.sorted(), subscriptions: $0.subscriptions.sorted(),
                                    rings: $0.rings.keys.sorted())
            },
            counters: statusCounters(for: peer))
        do {
            return try Self.report(try report.encoded(), inline: ServerMessage.statusReport, file: ServerMessage.statusReportFile, name: "status")
        } catch {
            throw ProtocolError(.internalError, "cannot produce the status report: \(error)")
        }
    }

    /// METRICS: the Prometheus text, under STATUS's rule (a segment's series only for its readers).
    private func metricsReply(for peer: PeerCredentials) throws(ProtocolError) -> Reply {
        let visible = isPrivileged(peer) ? nil : Set(segments.values.filter { mayRead($0, peer) }.map(\.name))
        do {
            return try Self.report(Array(metricsText(visibleSegments: visible).utf8), inline: ServerMessage.metricsReport,
                                   file: ServerMessage.metricsReportFile, name: "metrics")
        } catch {
            throw ProtocolError(.internalError, "cannot produce the metrics: \(error)")
        }
    }

    /// A report inline when it fits a frame, else in a memfd (thousands of segments or clients).
    private static func report(_ bytes: [UInt8], inline: ([UInt8]) -> ServerMessage, file: (UInt64) -> ServerMessage,
                               name: String) throws -> Reply {
        if bytes.count <= ControlProtocol.maximumFrameSize - ControlProtocol.headerSize {
            return Reply(message: inline(bytes))
        }
        let memfd = try bytes.withUnsafeBytes { try MemoryFile.create(name: "shmbroker-\(name)", contents: $0) }
        return Reply(message: file(UInt64(bytes.count)), descriptors: [memfd])
    }
}
