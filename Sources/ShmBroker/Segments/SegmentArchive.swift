import Foundation
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage

/// The on-disk copy of a persistent segment's latest version (`"persist": true`), so that content
/// and version survive `systemctl stop`/`start` and reboots, not only restarts (which the fd store
/// covers). One file per segment, `DIRECTORY/NAME.segment`:
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | magic `SHMBSAVE` |
/// | 8 | 4 | format version, 1 |
/// | 12 | 4 | name length |
/// | 16 | 64 | segment name, NUL-padded |
/// | 80 | 8 | version |
/// | 88 | 8 | payload length |
/// | 96 | 8 | CRC-64/XZ of the payload |
/// | 104 | 8 | publish time, ns since the Unix epoch |
/// | 112 | 8 | CRC-64/XZ of bytes 0 ..< 112 |
/// | 120 | 8 | reserved, 0 |
/// | 128 | length | payload |
///
/// All integers little-endian. A file is written to a temporary name, fsynced, renamed over the
/// old one and the directory fsynced, so a crash or a full disk leaves the previous file intact.
struct SegmentArchive {
    static let magic = Array("SHMBSAVE".utf8)
    static let formatVersion: UInt32 = 1
    static let headerSize = 128

    let directory: String
    /// Users besides root whose files are trusted: the daemon's own.
    let trustedOwners: Set<UInt32>

    /// Versions at or above 2^63 are refused: a restored segment must be able to go on publishing
    /// (2^64 − 1 would make the next publish version 0, "never published").
    static let highestContinuableVersion: UInt64 = 1 << 63

    func path(of segment: String) -> String { directory + "/" + segment + ".segment" }

    /// Where the highest version ever saved is recorded (`.NAME.highest`), so that a saved file
    /// replaced by an older copy is recognised as a rollback.
    func markPath(of segment: String) -> String { directory + "/." + segment + ".highest" }

    /// The highest version ever saved for `segment`, or nil if none is recorded (or the record
    /// fails its check: 8 bytes of version, then their CRC-64).
    func highestSaved(_ segment: String) -> UInt64? {
        guard let opened = try? FileSystem.openRegularFile(markPath(of: segment)) else { return nil }
        let (fd, entry) = opened
        defer { fd.closeQuietly() }
        guard entry.size == 16, entry.uid == 0 || trustedOwners.contains(entry.uid) else { return nil }
        var record = [UInt8](repeating: 0, count: 16)
        guard (try? record.withUnsafeMutableBytes { try fd.readFully(into: $0, atOffset: 0) }) == 16 else { return nil }
        let version = record.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) }
        let crc = record.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        return record.withUnsafeBytes { CRC64.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<8])) } == crc ? version : nil
    }

    /// Why a saved file was not used, or a save failed.
    enum Failure: Error, CustomStringConvertible {
        /// The file exists but could not be read (permissions, I/O): it is left where it is.
        case unreadable(String, Errno)
        case truncated(String, size: Int)
        case foreign(String, reason: String)
        case corrupt(String, reason: String)
        /// Not a regular file (a FIFO, a device, a link …), or owned by a user the daemon does
        /// not trust: never opened for reading, moved aside.
        case refused(FileSystemError)
        case cannotWrite(FileSystemError)

        var description: String {
            switch self {
            case let .unreadable(path, error): return "cannot read \(path): \(error); the file is left where it is"
            case let .truncated(path, size): return "\(path) is truncated (\(size) bytes)"
            case let .foreign(path, reason): return "\(path) is not a saved shmbroker segment: \(reason)"
            case let .corrupt(path, reason): return "\(path) is corrupt: \(reason)"
            case let .refused(error): return "\(error)"
            case let .cannotWrite(error): return "\(error); the previous file is kept"
            }
        }

        /// Whether the file should be moved aside: everything but a file the daemon cannot read,
        /// which may be fine once its permissions or the disk are repaired.
        var movesFileAside: Bool {
            if case .unreadable = self { return false }
            return true
        }
    }

    /// The saved version of `segment`, checked (header CRC, name, length, payload CRC); nil when
    /// nothing was saved.
    func load(_ segment: String, capacity: Int) throws(Failure) -> SegmentSnapshot? {
        let path = path(of: segment)
        let opened: (FileDescriptor, FileSystem.Entry)?
        do {
            opened = try FileSystem.openRegularFile(path)
        } catch {
            if case .system(let code) = error.kind { throw .unreadable(path, code) }
            throw .refused(error)
        }
        guard let (fd, entry) = opened else { return nil }
        guard entry.uid == 0 || trustedOwners.contains(entry.uid) else {
            fd.closeQuietly()
            throw .refused(FileSystemError(path: path, operation: "trust", kind: .untrustedOwner(uid: entry.uid)))
        }
        defer { fd.closeQuietly() }
        let size = entry.size  // from the fstat that found it a regular file
        guard size >= Self.headerSize else { throw .truncated(path, size: size) }
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        do {
            let read = try header.withUnsafeMutableBytes { try fd.readFully(into: $0, atOffset: 0) }
            guard read == Self.headerSize else { throw Failure.truncated(path, size: size) }
        } catch let failure as Failure {
            throw failure
        } catch {
            throw .unreadable(path, (error as? Errno) ?? .ioError)
        }
        func field<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T {
            header.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        }
        guard Array(header[0..<8]) == Self.magic else { throw .foreign(path, reason: "no SHMBSAVE magic") }
        guard field(UInt32.self, 8) == Self.formatVersion else { throw .foreign(path, reason: "format version \(field(UInt32.self, 8))") }
        let headerCRC = header.withUnsafeBytes { CRC64.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<112])) }
        guard headerCRC == field(UInt64.self, 112) else { throw .corrupt(path, reason: "its header fails its CRC") }
        let nameLength = Int(field(UInt32.self, 12))
        let name = nameLength <= 64 ? String(decoding: header[16..<16 + nameLength], as: UTF8.self) : ""
        guard name == segment else { throw .foreign(path, reason: "it holds segment \"\(name.prefix(64))\"") }
        let version = field(UInt64.self, 80), length = field(UInt64.self, 88)
        guard version > 0 else { throw .corrupt(path, reason: "version 0") }
        guard version < Self.highestContinuableVersion else {
            throw .corrupt(path, reason: "version \(version) cannot be continued (the next publish would wrap to 0)")
        }
        guard length <= UInt64(capacity) else {
            throw .foreign(path, reason: "its \(length) bytes exceed the segment's capacity of \(capacity)")
        }
        guard size == Self.headerSize + Int(length) else { throw .truncated(path, size: size) }
        var payload = [UInt8](repeating: 0, count: Int(length))
        do {
            let read = try payload.withUnsafeMutableBytes { try fd.readFully(into: $0, atOffset: Self.headerSize) }
            guard read == payload.count else { throw Failure.truncated(path, size: size) }
        } catch let failure as Failure {
            throw failure
        } catch {
            throw .unreadable(path, (error as? Errno) ?? .ioError)
        }
        let stored = field(UInt64.self, 96)
        let computed = CRC64.checksum(payload)
        guard computed == stored else { throw .corrupt(path, reason: "its content fails its CRC-64") }
        return SegmentSnapshot(version: version, bytes: payload, crc64: stored, publishedAtNanoseconds: field(UInt64.self, 104))
    }

    /// Writes `snapshot` atomically: temporary file, fsync, rename, directory fsync.
    func save(_ segment: String, _ snapshot: SegmentSnapshot) throws(Failure) {
        let path = path(of: segment)
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
            header.withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
        }
        header.replaceSubrange(0..<8, with: Self.magic)
        put(Self.formatVersion, 8)
        let name = Array(segment.utf8.prefix(64))
        put(UInt32(name.count), 12)
        header.replaceSubrange(16..<16 + name.count, with: name)
        put(snapshot.version, 80)
        put(UInt64(snapshot.bytes.count), 88)
        put(snapshot.crc64, 96)
        put(snapshot.publishedAtNanoseconds, 104)
        put(header.withUnsafeBytes { CRC64.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<112])) }, 112)
        do {
            try FileSystem.replace(path, with: [header, snapshot.bytes], permissions: 0o600)
            if snapshot.version > highestSaved(segment) ?? 0 {
                var record = [UInt8](repeating: 0, count: 16)
                record.withUnsafeMutableBytes { $0.storeBytes(of: snapshot.version.littleEndian, toByteOffset: 0, as: UInt64.self) }
                let crc = record.withUnsafeBytes { CRC64.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<8])) }
                record.withUnsafeMutableBytes { $0.storeBytes(of: crc.littleEndian, toByteOffset: 8, as: UInt64.self) }
                try FileSystem.replace(markPath(of: segment), with: [record], permissions: 0o600)
            }
        } catch {
            throw .cannotWrite(error)
        }
    }

    /// Moves a file that failed its checks aside (`NAME.segment.rejected`, then `.rejected.2` …),
    /// so it is neither served nor overwritten before someone can look at it; every rejected copy
    /// is kept.
    ///
    /// - Returns: where the file went.
    func reject(_ segment: String) throws(FileSystemError) -> String {
        try FileSystem.moveAside(path(of: segment), suffix: ".rejected")
    }
}
