import ShmBrokerCore

/// What a mirror puts in the bucket for one version of a segment, and how it is read back.
///
/// A value is a 72-byte little-endian header followed by bytes (see `docs/MIRROR.md`):
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | magic `SHMBMIR1` |
/// | 8 | 4 | header size (72) |
/// | 12 | 4 | kind: 1 whole version, 2 chunk, 3 commit of a chunked version |
/// | 16 | 8 | epoch: the source segment's `createdAt` (ns) |
/// | 24 | 8 | version: the source's version number |
/// | 32 | 8 | CRC-64/XZ of the whole version |
/// | 40 | 8 | length of the whole version |
/// | 48 | 8 | the source's publish time, ns since the Unix epoch |
/// | 56 | 4 | chunk index (chunks), else 0 |
/// | 60 | 4 | chunk count (chunks and commits), else 0 |
/// | 64 | 8 | writer: a random number each exporter process picks, to know its own values |
///
/// A version up to the chunk size is one value (kind 1, the bytes follow). A larger one goes as
/// chunks (kind 2, each with its piece) under the chunk keys, then a commit (kind 3, no bytes)
/// under the segment's key: an importer acts only on the segment's key, and assembles a
/// version only when every chunk carries the commit's epoch, version and count.
///
/// The bucket's own revision is not used as a version: it is the bucket's sequence, shared by
/// every key.
public struct MirrorValue: Sendable, Equatable {
    public enum Kind: UInt32, Sendable {
        case whole = 1
        case chunk = 2
        case commit = 3
    }

    public static let magic: UInt64 = 0x3152_494D_424D_4853  // "SHMBMIR1" little-endian
    public static let headerSize = 72

    public var kind: Kind
    public var epoch: UInt64
    public var version: UInt64
    public var crc64: UInt64
    public var length: UInt64
    public var publishedAtNanoseconds: UInt64
    public var chunkIndex: UInt32 = 0
    public var chunkCount: UInt32 = 0
    /// The exporter process that wrote it (random per process), so that an exporter whose put
    /// timed out can tell its own value from another exporter's.
    public var writer: UInt64 = 0

    public init(kind: Kind, epoch: UInt64, version: UInt64, crc64: UInt64, length: UInt64, publishedAtNanoseconds: UInt64,
                chunkIndex: UInt32 = 0, chunkCount: UInt32 = 0, writer: UInt64 = 0) {
        self.writer = writer
        self.kind = kind
        self.epoch = epoch
        self.version = version
        self.crc64 = crc64
        self.length = length
        self.publishedAtNanoseconds = publishedAtNanoseconds
        self.chunkIndex = chunkIndex
        self.chunkCount = chunkCount
    }

    /// The header followed by `payload`.
    public func encoded(payload: UnsafeRawBufferPointer) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.headerSize + payload.count)
        bytes.withUnsafeMutableBytes { out in
            write(into: out)
            if payload.count > 0 {
                UnsafeMutableRawBufferPointer(rebasing: out[Self.headerSize...]).copyMemory(from: payload)
            }
        }
        return bytes
    }

    /// Writes the header into the first ``headerSize`` bytes of `out`, in front of a payload the
    /// caller put there (the exporter reads a version straight in after it: no second copy).
    public func write(into out: UnsafeMutableRawBufferPointer) {
        precondition(out.count >= Self.headerSize)
        out.storeBytes(of: Self.magic.littleEndian, toByteOffset: 0, as: UInt64.self)
        out.storeBytes(of: UInt32(Self.headerSize).littleEndian, toByteOffset: 8, as: UInt32.self)
        out.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 12, as: UInt32.self)
        for (offset, field) in [(16, epoch), (24, version), (32, crc64), (40, length), (48, publishedAtNanoseconds)] {
            out.storeBytes(of: field.littleEndian, toByteOffset: offset, as: UInt64.self)
        }
        out.storeBytes(of: chunkIndex.littleEndian, toByteOffset: 56, as: UInt32.self)
        out.storeBytes(of: chunkCount.littleEndian, toByteOffset: 60, as: UInt32.self)
        out.storeBytes(of: writer.littleEndian, toByteOffset: 64, as: UInt64.self)
    }

    /// Reads and checks a value from the bucket, which is treated as hostile: every field that
    /// could make the importer allocate, loop or serve wrong bytes is checked here.
    ///
    /// - Parameters:
    ///   - bytes: the value as stored.
    ///   - capacity: the local segment's capacity: no version may be longer.
    ///   - chunkSize: the largest piece a chunk may carry.
    /// - Returns: the header, and where its payload starts in `bytes`.
    public static func decode(_ bytes: UnsafeRawBufferPointer, capacity: Int, chunkSize: Int) throws(MirrorValueError) -> MirrorValue {
        guard bytes.count >= headerSize else { throw .truncated(bytes.count) }
        func u64(_ offset: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
        func u32(_ offset: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
        guard u64(0) == magic else { throw .badMagic }
        guard u32(8) == UInt32(headerSize) else { throw .badHeaderSize(u32(8)) }
        guard let kind = Kind(rawValue: u32(12)) else { throw .unknownKind(u32(12)) }
        let value = MirrorValue(kind: kind, epoch: u64(16), version: u64(24), crc64: u64(32), length: u64(40),
                                publishedAtNanoseconds: u64(48), chunkIndex: u32(56), chunkCount: u32(60), writer: u64(64))
        guard value.version > 0 else { throw .zeroVersion }
        guard value.length <= UInt64(capacity) else { throw .tooLarge(length: value.length, capacity: capacity) }
        let payload = bytes.count - headerSize
        switch kind {
        case .whole:
            guard value.chunkCount == 0, value.chunkIndex == 0 else { throw .badChunking("a whole value with chunk fields") }
            guard UInt64(payload) == value.length else { throw .lengthMismatch(header: value.length, carried: payload) }
        case .commit:
            guard payload == 0 else { throw .lengthMismatch(header: 0, carried: payload) }
            guard value.chunkCount == chunkCount(length: value.length, chunkSize: chunkSize), value.chunkCount > 1 else {
                throw .badChunking("\(value.chunkCount) chunks for \(value.length) bytes in chunks of \(chunkSize)")
            }
        case .chunk:
            guard value.chunkCount == chunkCount(length: value.length, chunkSize: chunkSize), value.chunkIndex < value.chunkCount else {
                throw .badChunking("chunk \(value.chunkIndex) of \(value.chunkCount) for \(value.length) bytes")
            }
            let expected = min(chunkSize, Int(value.length) - Int(value.chunkIndex) * chunkSize)
            guard payload == expected else { throw .lengthMismatch(header: UInt64(expected), carried: payload) }
        }
        return value
    }

    /// How many chunks a version of `length` bytes takes (1: it goes whole).
    public static func chunkCount(length: UInt64, chunkSize: Int) -> UInt32 {
        length <= UInt64(chunkSize) ? 1 : UInt32(clamping: (length + UInt64(chunkSize) - 1) / UInt64(chunkSize))
    }
}

/// Why a value from the bucket was rejected. ``cause`` is its stable name, used in the metrics
/// (`reason` label) and logged once per cause and segment.
public enum MirrorValueError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated(Int)
    case badMagic
    case badHeaderSize(UInt32)
    case unknownKind(UInt32)
    case zeroVersion
    case tooLarge(length: UInt64, capacity: Int)
    case lengthMismatch(header: UInt64, carried: Int)
    case badChunking(String)
    case chunkMissing(index: Int)
    case chunkMismatch(index: Int)
    case checksumMismatch(version: UInt64)
    case versionFromThePast(version: UInt64, latest: UInt64)

    public var cause: String {
        switch self {
        case .truncated: return "truncated"
        case .badMagic: return "bad-magic"
        case .badHeaderSize: return "bad-header-size"
        case .unknownKind: return "unknown-kind"
        case .zeroVersion: return "zero-version"
        case .tooLarge: return "too-large"
        case .lengthMismatch: return "length-mismatch"
        case .badChunking: return "bad-chunking"
        case .chunkMissing: return "chunk-missing"
        case .chunkMismatch: return "chunk-mismatch"
        case .checksumMismatch: return "crc-mismatch"
        case .versionFromThePast: return "version-from-the-past"
        }
    }

    public var description: String {
        switch self {
        case .truncated(let count): return "\(cause): \(count) bytes, shorter than the \(MirrorValue.headerSize)-byte header"
        case .badMagic: return "\(cause): not a shmbroker mirror value"
        case .badHeaderSize(let size): return "\(cause): header size \(size), expected \(MirrorValue.headerSize)"
        case .unknownKind(let kind): return "\(cause): kind \(kind)"
        case .zeroVersion: return "\(cause): version 0"
        case let .tooLarge(length, capacity): return "\(cause): \(length) bytes do not fit the local segment's \(capacity)"
        case let .lengthMismatch(header, carried): return "\(cause): the header says \(header) bytes, the value carries \(carried)"
        case .badChunking(let detail): return "\(cause): \(detail)"
        case .chunkMissing(let index): return "\(cause): chunk \(index) is not in the bucket"
        case .chunkMismatch(let index): return "\(cause): chunk \(index) belongs to another version (replaced meanwhile)"
        case .checksumMismatch(let version): return "\(cause): version \(version) does not match its CRC-64"
        case let .versionFromThePast(version, latest): return "\(cause): version \(version) is not after the local \(latest)"
        }
    }
}

/// The bucket's keys: `<host>.seg.<segment>` for a version or its commit, and
/// `<host>.chunk.<segment>.<index>` for the chunks of a large one. Host names have no dot, and a
/// chunk key ends in a number, so no two segments' keys meet.
public enum MirrorKeys {
    public static func value(host: String, segment: String) -> String { "\(host).seg.\(segment)" }
    public static func chunk(host: String, segment: String, index: Int) -> String { "\(host).chunk.\(segment).\(index)" }
    /// The core NATS subject of a host's heartbeats.
    public static func heartbeat(bucket: String, host: String) -> String { "shmbroker.\(bucket).heartbeat.\(host)" }
}
