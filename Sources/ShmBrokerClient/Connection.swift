import Foundation
import ShmBrokerPlatform
import ShmBrokerProtocol
import Synchronization
import SystemPackage

/// One connection to the daemon: the socket plus a receive thread that routes replies to waiting
/// requests (by request id) and events to a handler. ``ShmBrokerClient`` replaces it after a
/// daemon restart.
final class Connection: Sendable {
    struct Reply: Sendable {
        var message: ServerMessage
        var descriptors: [FileDescriptor]
    }

    private struct State {
        var nextRequestID: UInt32 = 1
        var waiting: [UInt32: CheckedContinuation<Reply, any Error>] = [:]
        var closed = false
        /// An error the daemon sent for the whole connection (request id 0), such as
        /// too-many-clients: what requests fail with once the connection is gone.
        var connectionError: ProtocolError?
    }

    private var failure: ShmBrokerClientError {
        state.withLock { $0.connectionError }.map { .refused($0) } ?? .disconnected
    }

    private let socket: FileDescriptor
    private let state = Mutex(State())
    private let onEvent: @Sendable (ServerMessage) -> Void
    private let onClose: @Sendable (Connection) -> Void

    /// - Parameters:
    ///   - socket: a connected control socket; the connection owns it from now on.
    ///   - onEvent: called on the receive thread for each VERSION or RETIRED event.
    ///   - onClose: called once the connection is gone, whoever closed it.
    init(socket: FileDescriptor, onEvent: @escaping @Sendable (ServerMessage) -> Void,
         onClose: @escaping @Sendable (Connection) -> Void) {
        self.socket = socket
        self.onEvent = onEvent
        self.onClose = onClose
    }

    /// Starts the receive thread; it ends when the socket closes.
    func startReceiving() {
        let thread = Thread { [self] in receiveLoop() }
        thread.name = "shmbroker-client-receive"
        thread.start()
    }

    /// Sends a request and waits for its reply; an ERROR reply throws ``ShmBrokerClientError/refused(_:)``.
    nonisolated(nonsending) func request(_ request: Request, descriptors: [FileDescriptor] = []) async throws(ShmBrokerClientError) -> Reply {
        let reply: Reply
        do {
            reply = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Reply, any Error>) in
                let id: UInt32? = state.withLock { state in
                    guard !state.closed else { return nil }
                    let id = state.nextRequestID
                    state.nextRequestID = id == UInt32.max ? 1 : id + 1
                    state.waiting[id] = continuation
                    return id
                }
                guard let id else {
                    continuation.resume(throwing: failure)
                    return
                }
                let frame = request.encode(requestID: id)
                let result = frame.withUnsafeBytes { bytes in
                    Result { () throws(Errno) in try SeqpacketSocket.send(socket, bytes, descriptors: descriptors) }
                }
                if case .failure(let error) = result {
                    if error == .messageTooLong, let waiter = state.withLock({ $0.waiting.removeValue(forKey: id) }) {
                        waiter.resume(throwing: ShmBrokerClientError.refused(
                            ProtocolError(.frameTooLarge, "request of \(frame.count) bytes is too large to send")))
                    } else if error != .brokenPipe && error != .connectionReset {
                        close()
                    }
                    // Otherwise the peer is gone: the receive thread, reading what it sent last
                    // (perhaps the reason) and then end-of-file, fails this request.
                }
            }
        } catch let error as ShmBrokerClientError {
            throw error
        } catch {
            throw .protocolViolation("\(error)")
        }
        if case .error(let refusal) = reply.message {
            reply.descriptors.forEach { $0.closeQuietly() }
            throw .refused(refusal)
        }
        return reply
    }

    /// Closes the connection: pending requests fail with ``ShmBrokerClientError/disconnected``.
    func close() {
        let wasOpen = state.withLock { state in
            let wasOpen = !state.closed
            state.closed = true
            return wasOpen
        }
        // Wakes the receive thread, which then closes the descriptor and fails what is pending.
        if wasOpen { _ = shutdown(socket.rawValue, Int32(SHUT_RDWR)) }
    }

    private func receiveLoop() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: ControlProtocol.maximumFrameSize + 1, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let message: ReceivedMessage?
            do {
                message = try SeqpacketSocket.receive(socket, into: buffer, maximumDescriptors: 4)
            } catch {
                break
            }
            guard let message, message.byteCount > 0 || !message.descriptors.isEmpty else { break }
            route(UnsafeRawBufferPointer(rebasing: buffer[..<min(message.byteCount, ControlProtocol.maximumFrameSize)]),
                  descriptors: message.descriptors)
        }
        let waiting = state.withLock { state in
            state.closed = true
            defer { state.waiting.removeAll() }
            return state.waiting
        }
        socket.closeQuietly()
        let error = failure
        waiting.values.forEach { $0.resume(throwing: error) }
        onClose(self)
    }

    private func route(_ frame: UnsafeRawBufferPointer, descriptors: [FileDescriptor]) {
        let header: FrameHeader
        let message: ServerMessage
        do {
            header = try FrameHeader.parse(frame)
            message = try ServerMessage.decode(type: header.type, body: Frame.body(of: frame))
        } catch {
            descriptors.forEach { $0.closeQuietly() }
            return
        }
        switch message {
        case .versionEvent, .retiredEvent, .stalenessEvent:
            descriptors.forEach { $0.closeQuietly() }
            onEvent(message)
        default:
            if let waiter = state.withLock({ $0.waiting.removeValue(forKey: header.requestID) }) {
                waiter.resume(returning: Reply(message: message, descriptors: descriptors))
            } else if header.requestID == 0, case .error(let refusal) = message {
                // A connection-level error (such as too-many-clients): every pending request gets
                // it, and so does any request made until the connection closes.
                let waiting = state.withLock { state in
                    state.connectionError = refusal
                    defer { state.waiting.removeAll() }
                    return state.waiting
                }
                waiting.values.forEach { $0.resume(throwing: ShmBrokerClientError.refused(refusal)) }
            } else {
                descriptors.forEach { $0.closeQuietly() }
            }
        }
    }
}
