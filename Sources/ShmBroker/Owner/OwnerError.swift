/// Why the owner could not do what was asked. Each case has a stable ``code``.
public enum OwnerError: Error, Equatable, CustomStringConvertible {
    /// The configuration file is invalid; the text lists every problem.
    case invalidConfiguration(String)
    /// The configuration has no segment of this name.
    case noSuchSegment(String)
    /// Segments could not be created or the socket could not listen.
    case startFailed(String)
    /// The payload is longer than the segment's capacity; nothing was written.
    case payloadTooLarge(segment: String, length: Int, capacity: Int)
    /// The segment left the configuration (a reload) or the owner stopped.
    case retired(String)
    /// Another thread is publishing to the same segment right now.
    case concurrentPublish(String)
    /// A version published at a given number was not after the segment's latest; nothing was written.
    case versionNotAfterLatest(segment: String, version: UInt64, latest: UInt64)
    /// The content did not match the CRC-64 it came with; nothing was written.
    case checksumMismatch(segment: String, version: UInt64)

    /// A short stable name for the case.
    public var code: String {
        switch self {
        case .invalidConfiguration: return "invalid-configuration"
        case .noSuchSegment: return "no-such-segment"
        case .startFailed: return "start-failed"
        case .payloadTooLarge: return "payload-too-large"
        case .retired: return "segment-retired"
        case .concurrentPublish: return "concurrent-publish"
        case .versionNotAfterLatest: return "version-not-after-latest"
        case .checksumMismatch: return "checksum-mismatch"
        }
    }

    public var description: String {
        switch self {
        case .invalidConfiguration(let text): return "\(code): \(text)"
        case .noSuchSegment(let name): return "\(code): the configuration has no segment named \"\(name)\""
        case .startFailed(let reason): return "\(code): \(reason)"
        case let .payloadTooLarge(segment, length, capacity):
            return "\(code): \(length) bytes do not fit segment \"\(segment)\" (capacity \(capacity)); nothing was written"
        case .retired(let name): return "\(code): segment \"\(name)\" is no longer served (removed by a reload, or the owner stopped)"
        case .concurrentPublish(let name):
            return "\(code): another thread is publishing to \"\(name)\"; a segment has one publishing thread at a time"
        case let .versionNotAfterLatest(segment, version, latest):
            return "\(code): version \(version) is not after segment \"\(segment)\"'s latest version \(latest); nothing was written"
        case let .checksumMismatch(segment, version):
            return "\(code): version \(version) for segment \"\(segment)\" does not match its CRC-64; nothing was written"
        }
    }
}
