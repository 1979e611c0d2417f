import ShmBrokerConfig
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Client connections: admission, reading requests, sending replies and events with
/// backpressure, and disconnecting. A disconnect is immediate for the socket's traffic (nothing
/// more is sent or read) and completed at the end of the loop's turn, so that no call chain finds
/// the client gone under it.
extension BrokerServer {
    /// Admits a new connection (returns nil and takes the socket), or says why not.
    func admit(_ socket: FileDescriptor, credentials: PeerCredentials) -> String? {
        loop.assertOnLoop()
        if let refusal = admissionRefusal(for: credentials) { return refusal }
        let client = ClientConnection(id: clients.takeID(), socket: socket, credentials: credentials)
        do {
            client.registration = try loop.register(socket, events: [.readable, .readHangUp], source: CallbackSource { [unowned self, unowned client] events in
                self.handleClient(client, events: events)
            })
        } catch {
            socket.closeQuietly()
            return nil
        }
        clients.add(client)
        counters.clientsAccepted += 1
        logger.debug("client connected", metadata: ["client": "\(client.id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)"])
        return nil
    }

    /// Why a new connection may not be served, or nil if it may. Root and the daemon's own uid
    /// may use every slot; everyone else leaves `limits.reservedClients` free and holds at most
    /// `limits.maxClientsPerUser`, so no unprivileged user can lock the others (or root) out.
    func admissionRefusal(for peer: PeerCredentials) -> String? {
        let limits = configuration.limits
        if isPrivileged(peer) {
            guard clients.count < limits.maximumClients else {
                return "the daemon serves at most \(limits.maximumClients) clients (limits.maxClients)"
            }
            return nil
        }
        guard clients.count < limits.maximumClients - limits.reservedClients else {
            return "the daemon serves at most \(limits.maximumClients) clients, \(limits.reservedClients) of them kept for root and the daemon's user (limits.maxClients, limits.reservedClients)"
        }
        let held = clients.connections(of: peer.uid)
        guard held < limits.maximumClientsPerUser else {
            return "uid \(peer.uid) already has \(held) connections, the most one user may hold (limits.maxClientsPerUser)"
        }
        return nil
    }

    func handleClient(_ client: ClientConnection, events: Epoll.Events) {
        loop.assertOnLoop()
        guard !client.isClosing else { return }
        if events.contains(.writable) {
            flush(client)
        }
        if events.contains(.readable) || events.contains(.hangUp) || events.contains(.readHangUp) {
            readRequests(from: client)
        }
    }

    func readRequests(from client: ClientConnection) {
        for _ in 0..<64 {
            guard !client.isClosing, !client.hasQueuedReplies else { return }
            let received: ReceivedMessage?
            do {
                received = try SeqpacketSocket.receive(client.socket, into: clients.receiveBuffer, maximumDescriptors: ControlProtocol.maximumDescriptors)
            } catch {
                disconnect(client, reason: "receive failed: \(error)")
                return
            }
            guard let message = received else { return }
            if message.byteCount == 0 && message.descriptors.isEmpty && !message.wasTruncated {
                disconnect(client, reason: nil)
                return
            }
            handleFrame(message, from: client)
        }
    }

    // MARK: Sending

    enum SendOutcome { case sent, full, failed }

    /// Sends one frame now if the socket takes it. A client that is closing takes nothing; a
    /// send error disconnects it.
    func trySend(_ frame: [UInt8], to client: ClientConnection, descriptors: [FileDescriptor] = []) -> SendOutcome {
        guard !client.isClosing else { return .failed }
        let outcome = frame.withUnsafeBytes { bytes in
            Result { () throws(Errno) in try SeqpacketSocket.send(client.socket, bytes, descriptors: descriptors) }
        }
        switch outcome {
        case .success(let sent):
            return sent ? .sent : .full
        case .failure(let error):
            disconnect(client, reason: error == .brokenPipe || error == .connectionReset ? nil : "send failed: \(error)")
            return .failed
        }
    }

    /// Sends a reply (or a must-deliver event) in order; queues it if the socket is full.
    /// Descriptors are closed once sent (the receiver has its own copies then).
    func send(_ frame: [UInt8], to client: ClientConnection, descriptors: [FileDescriptor] = []) {
        if client.hasQueuedReplies && !client.isClosing {
            client.enqueue(frame, descriptors: descriptors)
            return
        }
        switch trySend(frame, to: client, descriptors: descriptors) {
        case .sent:
            descriptors.forEach { $0.closeQuietly() }
        case .full:
            client.enqueue(frame, descriptors: descriptors)
            waitForWritable(client)
        case .failed:
            descriptors.forEach { $0.closeQuietly() }
        }
    }

    func waitForWritable(_ client: ClientConnection) {
        if client.stalledSince == nil { client.stalledSince = Clock.monotonicNanoseconds() }
        guard !client.watchingWritable, let registration = client.registration else { return }
        client.watchingWritable = true
        // While replies are queued, stop reading requests: backpressure instead of buffering.
        loop.modify(registration, events: [.writable, .readHangUp])
    }

    /// Sends queued replies, then one coalesced event per pending segment (for its latest version).
    func flush(_ client: ClientConnection) {
        var progressed = false
        while let (frame, descriptors) = client.firstQueued {
            switch trySend(frame, to: client, descriptors: descriptors) {
            case .sent:
                client.dequeueSent()
                progressed = true
            case .full:
                if progressed { client.stalledSince = Clock.monotonicNanoseconds() }
                return
            case .failed:
                return
            }
        }
        while let name = client.popPending() {
            guard let segment = segments[name], let receipt = segment.writer.latestReceipt,
                  client.wantsEvent(for: name, version: receipt.version) else { continue }
            let event = ServerMessage.versionEvent(segment: name, receipt).encode(requestID: 0)
            switch trySend(event, to: client) {
            case .sent:
                counters[segment: name].eventsSent += 1
                progressed = true
            case .full:
                client.pushBackPending(name)
                if progressed { client.stalledSince = Clock.monotonicNanoseconds() }
                return
            case .failed:
                return
            }
        }
        client.stalledSince = nil
        client.watchingWritable = false
        if let registration = client.registration { loop.modify(registration, events: [.readable, .readHangUp]) }
        readRequests(from: client)
    }

    /// Disconnects a client: from now on nothing is read from or sent to it; the rest (its rings'
    /// last entries published, its subscriptions and mappings forgotten, the socket closed) is
    /// done at the end of the loop's turn.
    func disconnect(_ client: ClientConnection, reason: String?) {
        loop.assertOnLoop()
        guard !client.isClosing, clients[client.id] === client else { return }  // once
        client.isClosing = true
        if let registration = client.registration { loop.deregister(registration) }
        client.registration = nil
        if let reason {
            logger.notice("client disconnected", metadata: ["client": "\(client.id)", "pid": "\(client.credentials.pid)", "reason": "\(reason)"])
        } else {
            logger.debug("client left", metadata: ["client": "\(client.id)"])
        }
        loop.deferToEndOfTurn { [unowned self] in self.finishDisconnect(client) }
    }

    private func finishDisconnect(_ client: ClientConnection) {
        // What a producer appended before it went away is still published.
        for token in client.rings.values {
            guard let ring = rings[token] else { continue }
            finalDrain(ring)
            removeRing(ring, detachCode: nil)
        }
        clients.remove(client)
        for name in client.subscriptions { segments[name]?.subscribers.remove(client.id) }
        for name in client.opened { segments[name]?.readers.remove(client.id) }
        client.close()
        if !stopping.load(ordering: .relaxed) { listener.resume() }  // a descriptor is free again
    }
}
