import ShmBrokerCore
import ShmBrokerProtocol
import SystemPackage

/// Everything that can go wrong for a client, each case with a message a person can act on.
public enum ShmBrokerClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The control socket could not be reached.
    case connectionFailed(socketPath: String, reason: String)
    /// The daemon closed the connection (it stopped, restarted, or dropped a slow client).
    case disconnected
    /// The daemon refused the request; `error.code` is stable and machine-readable.
    case refused(ProtocolError)
    /// The daemon sent something this client does not understand.
    case protocolViolation(String)
    /// Reading or mapping the segment failed.
    case segment(SegmentError)
    /// A system call failed.
    case system(operation: String, errno: Errno)
    /// A wait ended before the daemon did its part (for example, consuming a publish ring).
    case timedOut(String)

    /// The daemon's error code, if the daemon refused the request.
    public var code: ErrorCode? {
        if case .refused(let error) = self { return error.code }
        return nil
    }

    public var description: String {
        switch self {
        case let .connectionFailed(path, reason): return "cannot connect to \(path): \(reason)"
        case .disconnected: return "the daemon closed the connection"
        case .refused(let error): return "daemon refused: \(error)"
        case .protocolViolation(let detail): return "protocol violation: \(detail)"
        case .segment(let error): return "\(error)"
        case let .system(operation, errno): return "\(operation) failed: \(errno)"
        case .timedOut(let detail): return "timed out: \(detail)"
        }
    }
}
