import Foundation
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Frames from clients: checking a received frame (size, descriptors, handshake), decoding it,
/// and sending what the router (``respond(to:descriptors:from:)``) answers; payloads attached as
/// files. Runs on the event loop's thread, like everything in the server.
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
        let frame = UnsafeRawBufferPointer(rebasing: clients.receiveBuffer[..<min(message.byteCount, ControlProtocol.maximumFrameSize)])
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
        let expected = request.descriptorCount
        guard message.descriptors.count == expected else {
            let error = expected == 0
                ? ProtocolError(.unexpectedDescriptor, "\(request.type) takes no descriptors, got \(message.descriptors.count); they were closed")
                : ProtocolError(.missingDescriptor, "\(request.type) must carry exactly \(expected) descriptor\(expected == 1 ? "" : "s") (\(request.descriptorRoles)), got \(message.descriptors.count)")
            return reject(client, requestID: requestID, error, descriptors: message.descriptors)
        }
        if !client.greeted, request.type != .hello {
            return reject(client, requestID: requestID, ProtocolError(.handshakeRequired, "send HELLO before \(request.type)"),
                          descriptors: message.descriptors)
        }
        let received = ReceivedDescriptors(message.descriptors)
        let response = respond(to: request, descriptors: received, from: client)
        received.closeRest()
        switch response {
        case .reply(let reply):
            send(reply.message.encode(requestID: requestID), to: client, descriptors: reply.descriptors)
            reply.afterSending?()
        case .refusal(let error):
            reject(client, requestID: requestID, error)
        }
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

    /// Daemon-wide counters as `peer` may see them: a peer that may not read every segment gets
    /// the publish and event counts of the segments it may read only, since the totals would
    /// time the hidden segments' publishes and tell their subscribers.
    func statusCounters(for peer: PeerCredentials) -> StatusReport.Counters {
        let visible = isPrivileged(peer) ? nil : Set(segments.values.filter { mayRead($0, peer) }.map(\.name))
        return counters.statusView(visible: visible, owned: segments.owned)
    }

}
