/// Why a segment could not be published to, read, or adopted.
public enum SegmentError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The payload does not fit; nothing was written.
    case payloadTooLarge(length: Int, capacity: Int)
    /// The mapping does not start with the shmbroker magic.
    case badMagic(found: UInt64)
    /// The segment was written with a layout version this code does not understand.
    case unsupportedLayoutVersion(UInt32)
    /// A header field is inconsistent with the mapping (size, slots, stride).
    case inconsistentHeader(String)
    /// The current version's content does not match its stored CRC-64.
    case checksumMismatch(version: UInt64, stored: UInt64, computed: UInt64)
    /// The current version, read up to the end of block `block`, does not match that block's
    /// entry in the slot's checksum table (found by a block-by-block read before the block was
    /// handed on).
    case blockChecksumMismatch(version: UInt64, block: Int, stored: UInt64, computed: UInt64)
    /// The writer replaced the slot on every attempt; the reader should try again.
    case contended(attempts: Int)
    /// A version published at a given number must come after the latest; nothing was written.
    case versionNotAfterLatest(version: UInt64, latest: UInt64)

    public var description: String {
        switch self {
        case let .payloadTooLarge(length, capacity):
            return "payload of \(length) bytes exceeds the segment's capacity of \(capacity) bytes; nothing was written"
        case let .badMagic(found):
            return "not a shmbroker segment (magic 0x\(String(found, radix: 16)))"
        case let .unsupportedLayoutVersion(version):
            return "unsupported segment layout version \(version) (this build understands \(SegmentLayout.layoutVersion))"
        case let .inconsistentHeader(detail):
            return "inconsistent segment header: \(detail)"
        case let .checksumMismatch(version, stored, computed):
            return "version \(version) fails its CRC-64 check (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))"
        case let .blockChecksumMismatch(version, block, stored, computed):
            return "version \(version) block \(block) fails its CRC-64 check (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))"
        case let .versionNotAfterLatest(version, latest):
            return "version \(version) is not after the segment's latest version \(latest); nothing was written"
        case let .contended(attempts):
            return "the writer replaced the version during each of \(attempts) read attempts; retry"
        }
    }
}
