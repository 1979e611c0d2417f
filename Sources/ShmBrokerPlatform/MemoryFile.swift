import CShmBrokerShim
import Glibc
import SystemPackage

/// Anonymous memory files (`memfd_create`): the backing store of every segment.
///
/// A memfd leaves nothing on any file system, so a crash leaves nothing to clean up, and its size
/// can be sealed so that no holder of the fd can shrink it under a mapping (which would SIGBUS).
public enum MemoryFile {
    /// Creates a close-on-exec, sealable memfd of `size` bytes and seals its size.
    ///
    /// - Parameters:
    ///   - name: shown in `/proc/PID/fd` as `memfd:NAME`; for diagnostics only.
    ///   - size: the file's size in bytes; fixed for its lifetime.
    ///   - mode: permission bits applied with `fchmod`; `0o400` keeps readers of other uids from
    ///     reopening the segment writable through `/proc/self/fd/N`.
    ///   - reserve: allocate every page now (`fallocate`), so that later writes cannot fail for
    ///     want of memory; `ENOMEM` or `ENOSPC` now instead of an OOM kill later.
    public static func create(name: String, size: Int, mode: mode_t = 0o400, reserve: Bool = false) throws(Errno) -> FileDescriptor {
        let raw = try retryingInterrupts { shmb_memfd_create(name) }
        let fd = FileDescriptor(rawValue: raw)
        do throws(Errno) {
            _ = try retryingInterrupts { ftruncate(raw, off_t(size)) }
            if reserve { try Self.reserve(fd, size: size) }
            _ = try retryingInterrupts { shmb_seal_size(raw) }
            _ = try retryingInterrupts { fchmod(raw, mode) }
        } catch {
            fd.closeQuietly()
            throw error
        }
        return fd
    }

    /// Allocates every page of the first `size` bytes of `fd` now (`posix_fallocate`): later
    /// writes cannot fail for want of memory, and first touches need not allocate.
    public static func reserve(_ fd: FileDescriptor, size: Int) throws(Errno) {
        let result = posix_fallocate(fd.rawValue, 0, off_t(size))
        if result != 0 { throw Errno(rawValue: result) }
    }

    /// Whether the first `size` bytes of `fd` hold no hole (`SEEK_HOLE`), so that mapping them
    /// with ``MappedRegion/init(mapping:length:writable:populate:)`` allocates nothing.
    public static func isFullyAllocated(_ fd: FileDescriptor, size: Int) -> Bool {
        shmb_first_hole(fd.rawValue) >= Int64(size)
    }

    /// Creates an empty memfd that grows as it is written: a producer's staging file.
    ///
    /// - Parameter sealedAgainstShrinking: add `F_SEAL_SHRINK`, which lets the daemon map the
    ///   file safely (nobody can truncate it under the mapping) and copy from it directly.
    public static func createScratch(name: String, sealedAgainstShrinking: Bool = false) throws(Errno) -> FileDescriptor {
        let fd = FileDescriptor(rawValue: try retryingInterrupts { shmb_memfd_create(name) })
        if sealedAgainstShrinking {
            do {
                try addSeals(.shrink, to: fd)
            } catch {
                fd.closeQuietly()
                throw error
            }
        }
        return fd
    }

    /// Creates an unsealed memfd holding `bytes`: how a producer hands a large payload to the daemon.
    public static func create(name: String, contents bytes: UnsafeRawBufferPointer) throws(Errno) -> FileDescriptor {
        let fd = try createScratch(name: name)
        do throws(Errno) {
            try fd.writeFully(bytes)
        } catch {
            fd.closeQuietly()
            throw error
        }
        return fd
    }

    /// Opens a second, read-only open file description of `fd` through `/proc/self/fd`.
    ///
    /// This is what readers receive: `mmap(PROT_WRITE)`, `write` and `ftruncate` all fail on it.
    public static func readOnlyDuplicate(of fd: FileDescriptor) throws(Errno) -> FileDescriptor {
        let path = "/proc/self/fd/\(fd.rawValue)"
        let raw = try retryingInterrupts { open(path, O_RDONLY | O_CLOEXEC) }
        return FileDescriptor(rawValue: raw)
    }

    /// Adds seals to a memfd created with sealing allowed (`F_ADD_SEALS`).
    public static func addSeals(_ seals: Seals, to fd: FileDescriptor) throws(Errno) {
        _ = try retryingInterrupts { shmb_add_seals(fd.rawValue, seals.rawValue) }
    }

    /// The seals set on `fd` (`F_GET_SEALS`).
    public static func seals(of fd: FileDescriptor) throws(Errno) -> Seals {
        Seals(rawValue: try retryingInterrupts { shmb_get_seals(fd.rawValue) })
    }

    /// Why a descriptor another process handed over may not be mapped for `length` bytes.
    public enum MappingRefusal: Error, Equatable, CustomStringConvertible {
        case system(Errno)
        case notARegularFile
        case tooShort(size: Int, needed: Int)
        case notSealedAgainstShrinking

        public var description: String {
            switch self {
            case .system(let error): return "cannot examine it: \(error)"
            case .notARegularFile: return "it is not a memory file"
            case let .tooShort(size, needed): return "it holds \(size) bytes, not the \(needed) announced"
            case .notSealedAgainstShrinking: return "it is not sealed against shrinking (F_SEAL_SHRINK), so it could shrink under the mapping"
            }
        }
    }

    /// Checks a descriptor received from another process before mapping `length` bytes of it: a
    /// regular file at least that long, sealed so that nobody can shrink it afterwards. A mapping
    /// past a file's end, or of a file someone truncates, kills the reader with SIGBUS.
    public static func checkMappable(_ fd: FileDescriptor, length: Int) throws(MappingRefusal) {
        let entry: FileSystem.Entry
        do {
            entry = try FileSystem.entry(of: fd, path: "a received descriptor")
        } catch {
            throw .system(error.errno ?? .ioError)
        }
        guard entry.isRegularFile else { throw .notARegularFile }
        guard entry.size >= length else { throw .tooShort(size: entry.size, needed: length) }
        let current: Seals
        do {
            current = try seals(of: fd)
        } catch {
            // EINVAL: not a memfd (or a file system without seals), which nothing keeps from shrinking.
            throw error == .invalidArgument ? .notSealedAgainstShrinking : .system(error)
        }
        guard current.contains(.shrink) else { throw .notSealedAgainstShrinking }
    }

    /// The `F_SEAL_*` bits of a memfd.
    public struct Seals: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let seal = Seals(rawValue: shmb_seal_bit_seal())
        public static let shrink = Seals(rawValue: shmb_seal_bit_shrink())
        public static let grow = Seals(rawValue: shmb_seal_bit_grow())
        public static let write = Seals(rawValue: shmb_seal_bit_write())
        public static let futureWrite = Seals(rawValue: shmb_seal_bit_future_write())
    }
}

/// A shared memory mapping, unmapped when the last reference goes away.
///
/// Marked `@unchecked Sendable` because the mapping itself is plain shared memory; the protocol
/// layered on it (``ShmBrokerCore``) is what makes concurrent access correct.
public final class MappedRegion: @unchecked Sendable {
    /// The first byte of the mapping.
    public let base: UnsafeMutableRawPointer
    /// The mapping's length in bytes.
    public let length: Int
    /// Whether the mapping was made with `PROT_WRITE`.
    public let isWritable: Bool

    /// Maps `length` bytes of `fd` from offset 0 with `MAP_SHARED`.
    ///
    /// - Parameters:
    ///   - fd: the file to map; it may be closed afterwards, the mapping stays valid.
    ///   - length: bytes to map.
    ///   - writable: `PROT_READ | PROT_WRITE` if true, else `PROT_READ` only.
    ///   - populate: fill the page tables now (`MAP_POPULATE`), so that the first pass over the
    ///     memory takes no page faults; on a file with holes this allocates them.
    public init(mapping fd: FileDescriptor, length: Int, writable: Bool, populate: Bool = false) throws(Errno) {
        let protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        guard let address = mmap(nil, length, protection, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd.rawValue, 0),
              address != MAP_FAILED
        else { throw Errno(rawValue: errno) }
        self.base = address
        self.length = length
        self.isWritable = writable
    }

    deinit {
        munmap(base, length)
    }
}
