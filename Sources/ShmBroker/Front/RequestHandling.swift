import Foundation
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Request handling: one decoded frame from one client becomes a reply (and, for a publish, a new
/// version and its announcements). Runs on the event loop's thread, like everything in the server.
extension BrokerServer {
    func reject(_ client: ClientConnection, requestID: UInt32, _ error: ProtocolError, descriptors: [FileDescriptor] = []) {
        descriptors.forEach { $0.closeQuietly() }
        if [.malformedFrame, .unknownMessageType, .frameTooLarge, .unexpectedDescriptor].contains(error.code) {
            counters.malformedRequests += 1
        }
        counters.errorReplies += 1
        metrics.errorReply(error.code)
        logger.debug("request refused", metadata: ["client": "\(client.id)", "code": "\(error.code.name)", "message": "\(error.message)"])
        send(ServerMessage.error(error).encode(requestID: requestID), to: client)
    }

    func handleFrame(_ message: ReceivedMessage, from client: ClientConnection) {
        let frame = UnsafeRawBufferPointer(rebasing: receiveBuffer[..<min(message.byteCount, ControlProtocol.maximumFrameSize)])
        let requestID = frame.count >= 8 ? UInt32(littleEndian: frame.loadUnaligned(fromByteOffset: 4, as: UInt32.self)) : 0
        if message.wasTruncated || message.byteCount > ControlProtocol.maximumFrameSize {
            return reject(client, requestID: requestID, ProtocolError(.frameTooLarge,
                "frame exceeds the maximum of \(ControlProtocol.maximumFrameSize) bytes; publish larger payloads as an attached memfd"),
                descriptors: message.descriptors)
        }
        if message.descriptorsWereTruncated && message.descriptors.count < ControlProtocol.maximumDescriptors {
            // The kernel stops installing passed descriptors when the receiver (this daemon) is
            // out of them: the client did nothing wrong, and must learn whose resource ran out.
            counters.descriptorLimitRefusals += 1
            let limit = ResourceLimits.openFiles().current.map(String.init) ?? "unlimited"
            logger.error("a client's descriptors were dropped: the daemon is at its descriptor limit", metadata: [
                "client": "\(client.id)", "rlimitNofile": "\(limit)", "clients": "\(clients.count)",
            ])
            return reject(client, requestID: requestID, ProtocolError(.descriptorLimit,
                "the daemon could not receive the request's descriptors: it has reached its own limit of \(limit) open files (RLIMIT_NOFILE); retry later"),
                descriptors: message.descriptors)
        }
        if message.descriptorsWereTruncated {
            return reject(client, requestID: requestID, ProtocolError(.unexpectedDescriptor,
                "at most \(ControlProtocol.maximumDescriptors) descriptors may accompany a frame (two only with ATTACH_RING)"), descriptors: message.descriptors)
        }
        let request: Request
        do {
            let header = try FrameHeader.parse(frame)
            request = try Request.decode(type: header.type, body: Frame.body(of: frame))
        } catch {
            return reject(client, requestID: requestID, error, descriptors: message.descriptors)
        }
        var descriptors = message.descriptors
        if case .publish(_, .attachedFile) = request {
            guard descriptors.count == 1 else {
                return reject(client, requestID: requestID, ProtocolError(.missingDescriptor,
                    "a PUBLISH with an attached file must carry exactly one descriptor, got \(descriptors.count)"), descriptors: descriptors)
            }
        } else if case .attachRing = request {
            guard descriptors.count == 2 else {
                return reject(client, requestID: requestID, ProtocolError(.missingDescriptor,
                    "ATTACH_RING must carry exactly two descriptors (the ring memfd, then its eventfd), got \(descriptors.count)"),
                    descriptors: descriptors)
            }
        } else if !descriptors.isEmpty {
            return reject(client, requestID: requestID, ProtocolError(.unexpectedDescriptor,
                "\(request.type) takes no descriptors, got \(descriptors.count); they were closed"), descriptors: descriptors)
        }
        if !client.greeted, request.type != .hello {
            return reject(client, requestID: requestID, ProtocolError(.handshakeRequired, "send HELLO before \(request.type)"),
                          descriptors: descriptors)
        }
        switch request {
        case let .hello(version, name):
            guard version == ControlProtocol.version else {
                return reject(client, requestID: requestID, ProtocolError(.unsupportedProtocolVersion,
                    "protocol version \(version) is not supported; this daemon speaks version \(ControlProtocol.version)"))
            }
            client.greeted = true
            client.name = String(name.prefix(128))
            send(ServerMessage.helloOK(protocolVersion: ControlProtocol.version,
                                       maximumFrameSize: UInt32(ControlProtocol.maximumFrameSize),
                                       daemonVersion: "\(ownerName) \(Self.version)").encode(requestID: requestID), to: client)
        case .open(let name):
            handleOpen(name, requestID: requestID, client: client)
        case .subscribe(let name):
            guard let segment = lookUp(name, requestID: requestID, client: client, publishing: false) else { return }
            segment.subscribers.insert(client.id)
            client.subscriptions.insert(name)
            let latest = segment.writer.latestReceipt.map(VersionInfo.init) ?? VersionInfo(version: 0, length: 0, crc64: 0, publishedAtNanoseconds: 0)
            client.subscribedAt[name] = latest.version
            send(ServerMessage.subscribed(latest).encode(requestID: requestID), to: client)
        case .unsubscribe(let name):
            guard client.subscriptions.remove(name) != nil else {
                return reject(client, requestID: requestID, ProtocolError(.notSubscribed, "not subscribed to \"\(name)\""))
            }
            segments[name]?.subscribers.remove(client.id)
            client.subscribedAt.removeValue(forKey: name)
            client.removePending(name)
            send(ServerMessage.ok.encode(requestID: requestID), to: client)
        case let .publish(name, payload):
            let attached = descriptors.popLast()
            defer { attached?.closeQuietly() }
            guard let segment = lookUp(name, requestID: requestID, client: client, publishing: true) else { return }
            handlePublish(segment, payload: payload, attached: attached, requestID: requestID, client: client)
        case .status:
            handleStatus(requestID: requestID, client: client)
        case .attachRing(let name):
            handleAttachRing(name, descriptors: descriptors, requestID: requestID, client: client)
        case .detachRing(let name):
            handleDetachRing(name, requestID: requestID, client: client)
        case .metrics:
            handleMetrics(requestID: requestID, client: client)
        }
    }

    func lookUp(_ name: String, requestID: UInt32, client: ClientConnection, publishing: Bool) -> ManagedSegment? {
        guard BrokerConfiguration.isValidSegmentName(name) else {
            reject(client, requestID: requestID, ProtocolError(.invalidSegmentName,
                "\"\(name.prefix(80))\" is not a valid segment name (1 to 64 letters, digits, '.', '_' or '-')"))
            return nil
        }
        // A segment the peer may neither read nor publish to is answered exactly like one that
        // does not exist, as STATUS hides it: its name stays secret too.
        let peer = client.credentials
        guard let segment = segments[name], isPrivileged(peer) || mayRead(segment, peer)
                || segment.definition.publishers.allows(peer, daemonUID: daemonUID) else {
            if segments[name] != nil { logAccessDenied(name, client: client, publishing: publishing, answered: .noSuchSegment) }
            reject(client, requestID: requestID, ProtocolError(.noSuchSegment,
                isPrivileged(peer) ? "no segment named \"\(name)\"" : "no segment named \"\(name)\" that uid \(peer.uid) may use"))
            return nil
        }
        if publishing, segment.owner != nil {
            reject(client, requestID: requestID, ProtocolError(.ownerPublishes,
                "segment \"\(name)\" is published by its owner process (pid \(CurrentProcess.processID)) itself; a segment has one writer, so clients may read it but not publish"))
            return nil
        }
        let access = publishing ? segment.definition.publishers : segment.definition.readers
        guard access.allows(peer, daemonUID: daemonUID) else {
            logAccessDenied(name, client: client, publishing: publishing, answered: .permissionDenied)
            reject(client, requestID: requestID, ProtocolError(.permissionDenied,
                "uid \(peer.uid) may not \(publishing ? "publish to" : "read") segment \"\(name)\""))
            return nil
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

    func handleOpen(_ name: String, requestID: UInt32, client: ClientConnection) {
        guard let segment = lookUp(name, requestID: requestID, client: client, publishing: false) else { return }
        let descriptor: FileDescriptor
        let board: FileDescriptor
        do {
            descriptor = try segment.readOnlyDescriptor()
        } catch {
            return reject(client, requestID: requestID, descriptorFailure(error, "cannot open a read-only descriptor"))
        }
        do {
            board = try segment.boardDescriptor()
        } catch {
            descriptor.closeQuietly()
            return reject(client, requestID: requestID, descriptorFailure(error, "cannot duplicate the wait board"))
        }
        let layout = segment.writer.layout
        let reply = ServerMessage.opened(OpenedSegment(
            capacity: UInt64(layout.capacity), slotCount: UInt32(layout.slotCount),
            layoutVersion: SegmentLayout.layoutVersion, mappingSize: UInt64(layout.totalSize),
            latestVersion: segment.writer.latestVersion))
        segment.readers.insert(client.id)
        client.opened.insert(name)
        send(reply.encode(requestID: requestID), to: client, descriptors: [descriptor, board])
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

    func handlePublish(_ segment: ManagedSegment, payload: PublishPayload, attached: FileDescriptor?,
                       requestID: UInt32, client: ClientConnection) {
        let receipt: PublishReceipt
        do {
            switch payload {
            case .inline(let bytes):
                receipt = try pipeline.commit(to: segment, origin: .request) { try $0.publish(bytes) }
            case .attachedFile(let length):
                guard let file = attached else { return }
                receipt = try publish(from: file, length: length, into: segment, client: client)
            }
        } catch {
            return reject(client, requestID: requestID, error)
        }
        send(ServerMessage.published(VersionInfo(receipt)).encode(requestID: requestID), to: client)
    }

    /// Copies a payload from a producer's file into the segment. A file sealed against shrinking
    /// is mapped (the mapping cached per connection) and copied straight into the slot; any
    /// other file is read with `pread`, so a producer that truncates it mid-copy causes a short
    /// read (an error reply), never a SIGBUS in the daemon.
    func publish(from file: FileDescriptor, length: UInt64, into segment: ManagedSegment,
                 client: ClientConnection) throws(ProtocolError) -> PublishReceipt {
        let capacity = segment.writer.layout.capacity
        guard length <= UInt64(capacity) else {
            throw ProtocolError(.payloadTooLarge, SegmentError.payloadTooLarge(length: Int(clamping: length), capacity: capacity).description)
        }
        guard let info = try? FileSystem.entry(of: file, path: "the attached file"), info.isRegularFile else {
            throw ProtocolError(.badDescriptor, "the attached descriptor is not a regular file (use a memfd)")
        }
        // Only memory-backed files (memfd, tmpfs: the ones that know seals) are read: a file on a
        // FUSE or NFS mount could block this single event loop, and every client with it.
        guard let seals = try? MemoryFile.seals(of: file) else {
            throw ProtocolError(.badDescriptor,
                "the attached file is not memory-backed; attach a memfd (memfd_create) or a tmpfs file, never a file of another file system")
        }
        guard info.size >= Int(length) else {
            throw ProtocolError(.badDescriptor, "the attached file holds \(info.size) bytes, the request says \(length)")
        }
        // Fast path: a file sealed against shrinking can be mapped without SIGBUS risk, and the
        // copy into the slot then computes the CRC in the same pass.
        if length > 0, seals.contains(.shrink),
           let source = stagingMapping(of: file, inode: info.inode, length: Int(length), client: client) {
            return try pipeline.commit(to: segment, origin: .request) {
                try $0.publish(UnsafeRawBufferPointer(start: source.base, count: Int(length)))
            }
        }
        return try pipeline.commit(to: segment, origin: .request) { writer in
            try Self.copy(from: file, length: Int(length), into: writer)
        }
    }

    /// Reads a payload file into the writer's next slot with `pread`: a producer that truncates
    /// the file meanwhile causes a short read (an error), never a SIGBUS.
    private static func copy(from file: FileDescriptor, length: Int, into writer: SegmentWriter) throws -> PublishReceipt {
        do {
            return try writer.publish(length: length) { (buffer: UnsafeMutableRawBufferPointer) throws(ProtocolError) in
                let read: Int
                do {
                    read = try file.readFully(into: buffer, atOffset: 0)
                } catch {
                    throw ProtocolError(.badDescriptor, "reading the attached file failed: \(error)")
                }
                guard read == buffer.count else {
                    throw ProtocolError(.badDescriptor, "the attached file holds \(read) bytes, the request says \(buffer.count)")
                }
            }
        } catch {
            switch error {
            case .segment(let refusal): throw ProtocolError(.payloadTooLarge, refusal.description)
            case .fill(let failure): throw failure
            }
        }
    }

    /// A read-only mapping of at least `length` bytes of a client's staging file, reused while
    /// the client keeps sending the same file (memfd inodes are unique while the file lives).
    func stagingMapping(of file: FileDescriptor, inode: UInt64, length: Int, client: ClientConnection) -> MappedRegion? {
        if let cached = client.stagingMappings.first(where: { $0.inode == inode && $0.region.length >= length }) {
            return cached.region
        }
        guard let region = try? MappedRegion(mapping: file, length: length, writable: false) else { return nil }
        client.stagingMappings.removeAll { $0.inode == inode }
        if client.stagingMappings.count >= 4 { client.stagingMappings.removeFirst() }
        client.stagingMappings.append((inode, region))
        return region
    }

    /// Root and the owner's own uid: they see everything and may use the reserved connections.
    func isPrivileged(_ peer: PeerCredentials) -> Bool { peer.uid == 0 || peer.uid == daemonUID }

    /// Whether a segment's details (in STATUS and METRICS) may be shown to `peer`: its readers list decides.
    func mayRead(_ segment: ManagedSegment, _ peer: PeerCredentials) -> Bool {
        segment.definition.readers.allows(peer, daemonUID: daemonUID)
    }

    /// METRICS: the Prometheus text, under STATUS's rule (a segment's series only for its readers).
    func handleMetrics(requestID: UInt32, client: ClientConnection) {
        let peer = client.credentials
        let visible = isPrivileged(peer) ? nil : Set(segments.values.filter { mayRead($0, peer) }.map(\.name))
        let text = Array(metricsText(visibleSegments: visible).utf8)
        if text.count <= ControlProtocol.maximumFrameSize - ControlProtocol.headerSize {
            send(ServerMessage.metricsReport(text: text).encode(requestID: requestID), to: client)
            return
        }
        do {
            let file = try text.withUnsafeBytes { try MemoryFile.create(name: "shmbroker-metrics", contents: $0) }
            send(ServerMessage.metricsReportFile(length: UInt64(text.count)).encode(requestID: requestID), to: client, descriptors: [file])
        } catch {
            reject(client, requestID: requestID, ProtocolError(.internalError, "cannot produce the metrics: \(error)"))
        }
    }

    /// Daemon-wide counters as `peer` may see them: a peer that may not read every segment gets
    /// the publish and event counts of the segments it may read only, since the totals would
    /// time the hidden segments' publishes and tell their subscribers.
    func statusCounters(for peer: PeerCredentials) -> StatusReport.Counters {
        var shown = counters
        shown.publishes = totalPublishes
        guard !isPrivileged(peer) else { return shown }
        let visible = segments.values.filter { mayRead($0, peer) }
        shown.publishes = visible.reduce(0) { $0 &+ $1.publishCount }
        shown.eventsSent = visible.reduce(0) { $0 &+ $1.eventsSent }
        shown.eventsCoalesced = visible.reduce(0) { $0 &+ $1.eventsCoalesced }
        shown.slowSubscribersDisconnected = visible.reduce(0) { $0 &+ $1.slowSubscribersDropped }
        return shown
    }

    /// STATUS shows each peer only what it may see: segments whose `readers` list admits it (a
    /// segment it may not read is left out, so its version, length, CRC and timing stay secret),
    /// and clients only to root and the daemon's user — everyone else sees its own uid's
    /// connections. Counters are daemon-wide totals for root and the daemon's user.
    func handleStatus(requestID: UInt32, client: ClientConnection) {
        let peer = client.credentials
        let privileged = isPrivileged(peer)
        let report = StatusReport(
            daemon: StatusReport.Daemon(name: ownerName, version: Self.version, pid: CurrentProcess.processID, startedAt: startedAt.timeIntervalSince1970,
                                        configPath: configPath, socketPath: configuration.socket.path,
                                        protocolVersion: ControlProtocol.version),
            segments: segmentOrder.compactMap { segments[$0] }
                .filter { mayRead($0, peer) }
                .map { segment in
                let receipt = segment.writer.latestReceipt
                return StatusReport.Segment(
                    name: segment.name, capacity: UInt64(segment.definition.capacity), slots: UInt32(segment.definition.slots),
                    mappingSize: UInt64(segment.writer.layout.totalSize), version: receipt?.version ?? 0,
                    length: UInt64(receipt?.length ?? 0), crc64: String(format: "%016llx", receipt?.crc64 ?? 0),
                    lastPublishedAt: receipt.map { Double($0.publishedAtNanoseconds) / 1e9 },
                    readers: segment.readers.count, subscribers: segment.subscribers.count)
            },
            clients: clients.values.filter { privileged || $0.credentials.uid == peer.uid }.sorted { $0.id < $1.id }.map {
                StatusReport.Client(id: $0.id, name: $0.name, pid: $0.credentials.pid, uid: $0.credentials.uid,
                                    gid: $0.credentials.gid, opened: $0.opened.sorted(), subscriptions: $0.subscriptions.sorted(),
                                    rings: $0.rings.keys.sorted())
            },
            counters: statusCounters(for: peer))
        do {
            let json = try report.encoded()
            if json.count <= ControlProtocol.maximumFrameSize - ControlProtocol.headerSize {
                send(ServerMessage.statusReport(json: json).encode(requestID: requestID), to: client)
            } else {
                // Thousands of segments or clients: the report travels in a memfd, like a large publish.
                let file = try json.withUnsafeBytes { try MemoryFile.create(name: "shmbroker-status", contents: $0) }
                send(ServerMessage.statusReportFile(length: UInt64(json.count)).encode(requestID: requestID), to: client,
                     descriptors: [file])
            }
        } catch {
            reject(client, requestID: requestID, ProtocolError(.internalError, "cannot produce the status report: \(error)"))
        }
    }
}
