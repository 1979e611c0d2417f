/// The stable, machine-readable error codes of the control protocol (see `docs/PROTOCOL.md`).
///
/// Codes are never renumbered or reused; new ones are only appended.
public enum ErrorCode: UInt16, Sendable, CaseIterable, Codable {
    case malformedFrame = 1
    case unknownMessageType = 2
    case unsupportedProtocolVersion = 3
    case handshakeRequired = 4
    case noSuchSegment = 5
    case permissionDenied = 6
    case payloadTooLarge = 7
    case unexpectedDescriptor = 8
    case frameTooLarge = 9
    case missingDescriptor = 10
    case badDescriptor = 11
    case notSubscribed = 12
    case segmentRetired = 13
    case internalError = 14
    case invalidSegmentName = 15
    case tooManyClients = 16
    case invalidRing = 17
    case connectionLost = 18
    case descriptorLimit = 19
    case ownerPublishes = 20

    /// A short stable name, as printed by tools and written in the docs.
    public var name: String {
        switch self {
        case .malformedFrame: return "malformed-frame"
        case .unknownMessageType: return "unknown-message-type"
        case .unsupportedProtocolVersion: return "unsupported-protocol-version"
        case .handshakeRequired: return "handshake-required"
        case .noSuchSegment: return "no-such-segment"
        case .permissionDenied: return "permission-denied"
        case .payloadTooLarge: return "payload-too-large"
        case .unexpectedDescriptor: return "unexpected-descriptor"
        case .frameTooLarge: return "frame-too-large"
        case .missingDescriptor: return "missing-descriptor"
        case .badDescriptor: return "bad-descriptor"
        case .notSubscribed: return "not-subscribed"
        case .segmentRetired: return "segment-retired"
        case .internalError: return "internal-error"
        case .invalidSegmentName: return "invalid-segment-name"
        case .tooManyClients: return "too-many-clients"
        case .invalidRing: return "invalid-ring"
        case .connectionLost: return "connection-lost"
        case .descriptorLimit: return "descriptor-limit"
        case .ownerPublishes: return "owner-publishes"
        }
    }
}

/// A failure to decode a frame, or an error the peer reported, as code plus message.
public struct ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String

    public init(_ code: ErrorCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public static func malformed(_ message: String) -> ProtocolError { ProtocolError(.malformedFrame, message) }

    public var description: String { "\(code.name) (\(code.rawValue)): \(message)" }
}
