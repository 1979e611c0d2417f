import CShmBrokerShim
import Glibc
import SystemPackage

/// The credentials of a Unix-socket peer as of its `connect()`.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups (`SO_PEERGROUPS`); may be empty.
    public var groups: [UInt32]

    public init(pid: Int32, uid: UInt32, gid: UInt32, groups: [UInt32]) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.groups = groups
    }
}

/// One message received from a `SOCK_SEQPACKET` socket.
public struct ReceivedMessage {
    /// Bytes stored in the caller's buffer.
    public var byteCount: Int
    /// Descriptors that arrived with the message (`SCM_RIGHTS`); the caller owns them.
    public var descriptors: [FileDescriptor]
    /// The message was longer than the buffer; its tail was discarded by the kernel.
    public var wasTruncated: Bool
    /// Some descriptors did not fit the control buffer and were discarded by the kernel.
    public var descriptorsWereTruncated: Bool
}

/// `AF_UNIX` + `SOCK_SEQPACKET` sockets: reliable, ordered, message boundaries kept, and each
/// message may carry file descriptors. The control channel's transport.
public enum SeqpacketSocket {
    /// The longest path a `sockaddr_un` can hold.
    public static let maximumPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// Errors specific to socket set-up, with messages that name the path.
    public struct AddressError: Error, CustomStringConvertible {
        public var description: String
    }

    private static func withAddress<R>(
        _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(Errno) -> R
    ) throws -> R {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= maximumPathLength else {
            throw AddressError(description: "socket path '\(path)' must be 1 to \(maximumPathLength) bytes long")
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return try withUnsafePointer(to: &address) { pointer throws in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic throws in
                try body(generic, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }

    private static func makeSocket(nonBlocking: Bool) throws(Errno) -> FileDescriptor {
        var type = Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        if nonBlocking { type |= Int32(SOCK_NONBLOCK.rawValue) }
        return FileDescriptor(rawValue: try retryingInterrupts { socket(AF_UNIX, type, 0) })
    }

    /// Binds and listens on `path`, replacing a stale socket file left by a dead process.
    ///
    /// Refuses (with `EADDRINUSE`) when another process still accepts connections on `path`.
    /// - Parameters:
    ///   - path: the socket's file system path.
    ///   - backlog: the `listen` backlog.
    /// - Returns: a non-blocking listening socket.
    public static func listen(path: String, backlog: Int32 = 512) throws -> FileDescriptor {
        if let existing = try? connect(path: path) {
            existing.closeQuietly()
            throw Errno.addressInUse
        }
        var info = Glibc.stat()
        if lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK {
            unlink(path)
        }
        let fd = try makeSocket(nonBlocking: true)
        do {
            _ = try withAddress(path) { address, length throws(Errno) in
                try retryingInterrupts { bind(fd.rawValue, address, length) }
            }
            _ = try retryingInterrupts { Glibc.listen(fd.rawValue, backlog) }
        } catch {
            fd.closeQuietly()
            throw error
        }
        return fd
    }

    /// Connects a blocking client socket to `path`.
    public static func connect(path: String) throws -> FileDescriptor {
        let fd = try makeSocket(nonBlocking: false)
        do {
            _ = try withAddress(path) { address, length throws(Errno) in
                try retryingInterrupts { Glibc.connect(fd.rawValue, address, length) }
            }
        } catch {
            fd.closeQuietly()
            throw error
        }
        return fd
    }

    /// Accepts one pending connection as a non-blocking socket, or returns nil if none is pending.
    public static func accept(_ listener: FileDescriptor) throws(Errno) -> FileDescriptor? {
        do {
            return FileDescriptor(rawValue: try retryingInterrupts { shmb_accept(listener.rawValue) })
        } catch .wouldBlock, .resourceTemporarilyUnavailable {
            return nil
        } catch let error where error.rawValue == ECONNABORTED {
            return nil
        }
    }

    /// Sends one message with optional descriptors.
    /// - Returns: false if the socket is non-blocking and its buffer is full (`EAGAIN`).
    @discardableResult
    public static func send(
        _ socket: FileDescriptor, _ bytes: UnsafeRawBufferPointer, descriptors: [FileDescriptor] = []
    ) throws(Errno) -> Bool {
        do {
            if descriptors.isEmpty {
                _ = try retryingInterrupts { shmb_send_with_fds(socket.rawValue, bytes.baseAddress, bytes.count, nil, 0, 0) }
            } else {
                let raw = descriptors.map(\.rawValue)
                _ = try raw.withUnsafeBufferPointer { fds throws(Errno) in
                    try retryingInterrupts {
                        shmb_send_with_fds(socket.rawValue, bytes.baseAddress, bytes.count, fds.baseAddress, Int32(fds.count), 0)
                    }
                }
            }
            return true
        } catch .wouldBlock, .resourceTemporarilyUnavailable {
            return false
        }
    }

    /// Receives one message into `buffer`.
    /// - Returns: nil if a non-blocking socket has nothing to read; a message with `byteCount == 0`
    ///   and no descriptors means the peer closed the connection.
    public static func receive(
        _ socket: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, maximumDescriptors: Int = 4
    ) throws(Errno) -> ReceivedMessage? {
        let capacity = max(1, maximumDescriptors)
        let outcome = withUnsafeTemporaryAllocation(of: Int32.self, capacity: capacity) { fds in
            var count: Int32 = 0
            var flags: Int32 = 0
            let received = Result { () throws(Errno) in
                try retryingInterrupts {
                    shmb_recv_with_fds(socket.rawValue, buffer.baseAddress, buffer.count, fds.baseAddress,
                                       Int32(maximumDescriptors), &count, &flags, 0)
                }
            }
            return received.map { n in
                ReceivedMessage(
                    byteCount: n,
                    descriptors: count == 0 ? [] : fds.prefix(Int(count)).map { FileDescriptor(rawValue: $0) },
                    wasTruncated: flags & Int32(MSG_TRUNC) != 0,
                    descriptorsWereTruncated: flags & Int32(MSG_CTRUNC) != 0)
            }
        }
        switch outcome {
        case .success(let message): return message
        case .failure(.wouldBlock), .failure(.resourceTemporarilyUnavailable): return nil
        case .failure(let error): throw error
        }
    }

    /// Ends this side's sending (`shutdown(SHUT_WR)`): the peer reads what was sent, then EOF.
    public static func shutdownWriting(_ socket: FileDescriptor) {
        _ = Glibc.shutdown(socket.rawValue, Int32(SHUT_WR))
    }

    /// Reads and drops every message waiting on a non-blocking socket (closing any descriptors
    /// they carry), at most `limit`. Closing a Unix socket with unread messages resets the
    /// connection, and the peer may then lose what it had not read yet: drain first.
    public static func discardPending(_ socket: FileDescriptor, limit: Int = 64) {
        withUnsafeTemporaryAllocation(byteCount: 512, alignment: 8) { buffer in
            for _ in 0..<limit {
                guard let message = try? receive(socket, into: buffer, maximumDescriptors: 4),
                      message.byteCount > 0 || !message.descriptors.isEmpty else { return }
                message.descriptors.forEach { $0.closeQuietly() }
            }
        }
    }

    /// The peer's pid, uid, gid and supplementary groups as of its `connect()`.
    public static func peerCredentials(_ socket: FileDescriptor) throws(Errno) -> PeerCredentials {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        _ = try retryingInterrupts { shmb_peer_credentials(socket.rawValue, &pid, &uid, &gid) }
        var groups = [UInt32](repeating: 0, count: 256)
        let count = groups.withUnsafeMutableBufferPointer { shmb_peer_groups(socket.rawValue, $0.baseAddress, 256) }
        groups = count > 0 ? Array(groups.prefix(Int(min(count, 256)))) : []
        return PeerCredentials(pid: pid, uid: uid, gid: gid, groups: groups)
    }
}
