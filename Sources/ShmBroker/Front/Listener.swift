import Logging
import ShmBrokerConfig
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The control socket's listening side: it listens on the configured path (or adopts systemd's
/// socket), accepts connections, hands each to ``onConnection`` for admission, answers refused ones
/// with `too-many-clients` so that the refusal arrives, and stops accepting while the process is
/// out of descriptors instead of spinning.
final class Listener: EventSource {
    /// Decides about a new connection: nil when it was admitted (the callee now owns the
    /// socket), else the refusal's message.
    var onConnection: (FileDescriptor, PeerCredentials) -> String? = { _, _ in "not serving yet" }
    /// Counts in the log line that says accepting paused: (clients, segments).
    var census: () -> (clients: Int, segments: Int) = { (0, 0) }
    /// Called for every refused connection (for the counters).
    var onRefusal: () -> Void = {}

    private let loop: EventLoop
    private let logger: Logger
    private var socket: FileDescriptor?
    private var registration: EventRegistration?
    /// The socket file this process created, removed on close (nil for an adopted socket).
    private var ownedPath: String?
    private var paused = false
    private var pausesSinceLog = 0
    private var lastPauseLog: UInt64 = 0
    /// Refused connections, kept open (write side shut) until a deadline so the refusal arrives.
    private var refused: [(socket: FileDescriptor, closeAfter: UInt64)] = []
    /// Refusals are logged at most a few a second; the rest are counted in the next line.
    private var refusalLog = RateLimitedLog(linesPerInterval: 5, intervalNanoseconds: 1_000_000_000)

    /// Refused connections held open at once before the oldest is closed early.
    static let maximumHeldRefusals = 256
    /// Connections accepted per readiness report before the loop looks at everything else.
    static let acceptBatch = 64

    /// systemd's listening socket (socket activation), until ``listen(_:)`` adopts it.
    private var inherited: FileDescriptor?

    /// - Parameters:
    ///   - inherited: the listening socket systemd passed, if any: ``listen(_:)`` uses it
    ///     instead of binding the configured path.
    init(loop: EventLoop, logger: Logger, inherited: FileDescriptor?) {
        self.loop = loop
        self.logger = logger
        self.inherited = inherited
    }

    /// Adopts systemd's listening socket.
    private func adopt(_ adopted: FileDescriptor) throws {
        registration = try loop.register(adopted, events: .readable, source: self)
        socket = adopted
        logger.info("using the listening socket passed by systemd")
    }

    /// Adopts systemd's listening socket if it passed one; otherwise listens on `settings.path`
    /// with its mode and owner, creating its directory if needed.
    func listen(_ settings: SocketSettings) throws {
        if let inherited {
            self.inherited = nil
            return try adopt(inherited)
        }
        do {
            try FileSystem.createDirectory(FileSystem.split(settings.path).directory, permissions: 0o755)
            // Something other than a socket at the path: say what it is (binding would only
            // report EADDRINUSE, which reads as "another daemon").
            if let existing = try FileSystem.entry(at: settings.path), !existing.isSocket {
                let kind = existing.isSymbolicLink && !FileSystem.existsFollowingLinks(settings.path)
                    ? "a dangling symbolic link" : existing.kindDescription
                throw DaemonError.notASocket(settings.path, kind)
            }
        } catch let error as FileSystemError {
            throw DaemonError.cannotListen(settings.path, "\(error)")
        }
        let fd: FileDescriptor
        do {
            fd = try SeqpacketSocket.listen(path: settings.path)
        } catch Errno.addressInUse {
            throw DaemonError.socketInUse(settings.path)
        } catch {
            throw DaemonError.cannotListen(settings.path, "\(error)")
        }
        ownedPath = settings.path
        do {
            try FileSystem.setPermissions(settings.path, settings.mode)
        } catch {
            logger.warning("cannot set socket mode", metadata: ["path": "\(settings.path)", "error": "\(error)"])
        }
        if settings.owner != nil || settings.group != nil {
            do {
                try FileSystem.setOwner(settings.path, user: settings.owner, group: settings.group)
            } catch {
                fd.closeQuietly()
                throw DaemonError.socketOwnership(settings.path, error.errno ?? .ioError)
            }
        }
        registration = try loop.register(fd, events: .readable, source: self)
        socket = fd
    }

    func handle(_ events: Epoll.Events) {
        acceptConnections()
    }

    private func acceptConnections() {
        guard let socket, !paused else { return }
        for _ in 0..<Self.acceptBatch {
            let accepted: FileDescriptor?
            do {
                accepted = try SeqpacketSocket.accept(socket)
            } catch {
                if [.tooManyOpenFiles, .tooManyOpenFilesInSystem, .noMemory, .noBufferSpace].contains(error) {
                    pause(reason: error)
                } else {
                    logger.warning("accept failed", metadata: ["error": "\(error)"])
                }
                return
            }
            guard let connection = accepted else { return }
            guard let credentials = try? SeqpacketSocket.peerCredentials(connection) else {
                connection.closeQuietly()
                continue
            }
            if let refusal = onConnection(connection, credentials) {
                refuse(connection, credentials: credentials, message: refusal)
            }
        }
    }

    /// Answers a connection that may not be served with `too-many-clients`, then closes it.
    private func refuse(_ connection: FileDescriptor, credentials: PeerCredentials, message: String) {
        onRefusal()
        let refusal = ServerMessage.error(ProtocolError(.tooManyClients, message))
        _ = refusal.encode(requestID: 0).withUnsafeBytes { try? SeqpacketSocket.send(connection, $0) }
        // Closing now, with the client's HELLO unread, would reset the connection and
        // discard the refusal before the client reads it: end our side, close later. Past the
        // limit held at once, the oldest is closed early; what its client sent is read first, so
        // that closing resets nothing and its refusal still arrives.
        SeqpacketSocket.shutdownWriting(connection)
        if refused.count >= Self.maximumHeldRefusals { Self.closeRefused(refused.removeFirst().socket) }
        refused.append((connection, Clock.monotonicNanoseconds() + 1_000_000_000))
        refusalLog.record(now: Clock.monotonicNanoseconds()) { suppressed in
            logger.warning("client refused", metadata: [
                "uid": "\(credentials.uid)", "pid": "\(credentials.pid)", "reason": "\(message)",
            ].merging(suppressed.map { ["suppressedSinceLastLine": "\($0)"] } ?? [:]) { $1 })
        }
    }

    /// Closes a refused connection without resetting it (which could discard the refusal unread).
    private static func closeRefused(_ connection: FileDescriptor) {
        SeqpacketSocket.discardPending(connection)
        connection.closeQuietly()
    }

    /// The timer's job: closes refused connections whose refusal has had time to arrive, reports
    /// refusals not logged one by one, and resumes accepting after a pause.
    func tick(now: UInt64) {
        if let suppressed = refusalLog.takeSuppressed(now: now) {
            logger.warning("clients refused, not logged one by one", metadata: ["suppressed": "\(suppressed)"])
        }
        refused.removeAll { entry in
            guard now >= entry.closeAfter else { return false }
            Self.closeRefused(entry.socket)
            return true
        }
        resume()
    }

    /// Out of descriptors (or kernel memory): stop watching the listener, so a level-triggered
    /// epoll does not report it ready again at once and spin. Connections wait in the backlog
    /// until a descriptor frees (a client leaves) or the next timer tick retries.
    private func pause(reason: Errno) {
        guard let registration, !paused else { return }
        paused = true
        loop.deregister(registration)
        self.registration = nil
        pausesSinceLog += 1
        let now = Clock.monotonicNanoseconds()
        if now &- lastPauseLog >= 10_000_000_000 {
            lastPauseLog = now
            let limit = ResourceLimits.openFiles().current.map(String.init) ?? "unlimited"
            let (clients, segments) = census()
            logger.error("cannot accept connections: \(reason); waiting until a descriptor frees", metadata: [
                "clients": "\(clients)", "segments": "\(segments)", "rlimitNofile": "\(limit)",
                "pausesSinceLastLog": "\(pausesSinceLog)",
            ])
            pausesSinceLog = 0
        }
    }

    /// Watches the listener again after a pause; queued connections are accepted at once.
    func resume() {
        guard let socket, paused else { return }
        guard let registration = try? loop.register(socket, events: .readable, source: self) else { return }
        self.registration = registration
        paused = false
        acceptConnections()
    }

    /// Stops listening: closes the socket (removing the file this process created) and every
    /// refused connection still held.
    func close() {
        refused.forEach { Self.closeRefused($0.socket) }
        refused.removeAll()
        if let registration { loop.deregister(registration) }
        registration = nil
        socket?.closeQuietly()
        socket = nil
        if let ownedPath { FileSystem.remove(ownedPath) }
        ownedPath = nil
    }
}
