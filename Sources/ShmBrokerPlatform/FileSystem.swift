import Glibc
import SystemPackage

/// A file-system operation that failed, with the path and what was being done: the message a user
/// reads in the journal, so it names the file and the problem in words.
public struct FileSystemError: Error, Equatable, CustomStringConvertible {
    /// What went wrong, as a stable kind.
    public enum Kind: Equatable, Sendable {
        /// A system call failed.
        case system(Errno)
        /// The path exists but is not a regular file (a FIFO, a device, a directory, a link …).
        case notARegularFile(String)
        /// The path (or a component of it) exists but is not a directory.
        case notADirectory(String)
        /// A directory others may change, or owned by a user the daemon does not trust.
        case untrustedDirectory(String)
        /// A file owned by a user the daemon does not trust.
        case untrustedOwner(uid: UInt32)
    }

    /// The file or directory concerned.
    public var path: String
    /// What was being done: "open", "write", "rename" …
    public var operation: String
    public var kind: Kind

    public init(path: String, operation: String, kind: Kind) {
        self.path = path
        self.operation = operation
        self.kind = kind
    }

    /// The errno, for a failed system call.
    public var errno: Errno? {
        if case .system(let code) = kind { return code }
        return nil
    }

    public var description: String {
        switch kind {
        case .system(let code): return "cannot \(operation) \(path): \(code)"
        case .notARegularFile(let kind): return "\(path) is \(kind), not a regular file"
        case .notADirectory(let kind): return "\(path) is \(kind), not a directory"
        case .untrustedDirectory(let reason): return "\(path) \(reason)"
        case .untrustedOwner(let uid): return "\(path) is owned by uid \(uid), not by root or the daemon's user"
        }
    }
}

/// File-system calls the owner needs beyond descriptors: trusted directories, files that cannot
/// block or be redirected through a link, and atomic replacement. Every one of them is written
/// here once, so that the code above uses paths with the same care everywhere.
public enum FileSystem {
    /// What `lstat` found at a path.
    public struct Entry: Sendable, Equatable {
        public var mode: mode_t
        public var uid: UInt32
        public var gid: UInt32
        public var size: Int
        /// The inode number (unique among live files of one file system, memfds included).
        public var inode: UInt64
        /// The device of the file system holding it.
        public var device: UInt64

        init(_ info: Glibc.stat) {
            mode = info.st_mode
            uid = info.st_uid
            gid = info.st_gid
            size = Int(info.st_size)
            inode = UInt64(info.st_ino)
            device = UInt64(info.st_dev)
        }

        public var isRegularFile: Bool { mode & S_IFMT == S_IFREG }
        public var isDirectory: Bool { mode & S_IFMT == S_IFDIR }
        public var isSocket: Bool { mode & S_IFMT == S_IFSOCK }
        public var isSymbolicLink: Bool { mode & S_IFMT == S_IFLNK }

        /// The file's type in words, for messages: "a FIFO", "a directory" …
        public var kindDescription: String {
            switch mode & S_IFMT {
            case S_IFREG: return "a regular file"
            case S_IFDIR: return "a directory"
            case S_IFLNK: return "a symbolic link"
            case S_IFIFO: return "a FIFO"
            case S_IFSOCK: return "a socket"
            case S_IFCHR: return "a character device"
            case S_IFBLK: return "a block device"
            default: return "a file of unknown type"
            }
        }
    }

    /// `lstat(path)`: what is at the path itself (a link is not followed); nil if nothing is.
    public static func entry(at path: String) throws(FileSystemError) -> Entry? {
        var info = Glibc.stat()
        do {
            _ = try retryingInterrupts { Glibc.lstat(path, &info) }
        } catch {
            if error == .noSuchFileOrDirectory { return nil }
            throw FileSystemError(path: path, operation: "examine", kind: .system(error))
        }
        return Entry(info)
    }

    /// Whether something exists at `path` once links are followed (false for a dangling link).
    public static func existsFollowingLinks(_ path: String) -> Bool { Glibc.access(path, F_OK) == 0 }

    /// `fstat` of an open descriptor.
    public static func entry(of descriptor: FileDescriptor, path: String) throws(FileSystemError) -> Entry {
        var info = Glibc.stat()
        do {
            _ = try retryingInterrupts { Glibc.fstat(descriptor.rawValue, &info) }
        } catch {
            throw FileSystemError(path: path, operation: "examine", kind: .system(error))
        }
        return Entry(info)
    }

    /// Checks that a directory the daemon keeps files in cannot be changed by anyone it does not
    /// trust: it must be a directory (not a link to one), owned by root or one of `owners` (nil:
    /// anyone), and not writable by other users, nor by its group unless `groupMayWrite`. A directory writable
    /// by everyone is accepted only with the sticky bit and `stickyMayBeShared` (like `/tmp`, where
    /// nobody can remove or rename another user's file).
    ///
    /// - Throws: ``FileSystemError`` with kind `untrustedDirectory` naming the reason, or `system`.
    public static func checkTrustedDirectory(_ path: String, owners: Set<UInt32>?, groupMayWrite: Bool = false,
                                             stickyMayBeShared: Bool = false) throws(FileSystemError) {
        guard let entry = try entry(at: path) else {
            throw FileSystemError(path: path, operation: "examine", kind: .system(.noSuchFileOrDirectory))
        }
        func refuse(_ reason: String) -> FileSystemError {
            FileSystemError(path: path, operation: "trust", kind: .untrustedDirectory(reason))
        }
        guard entry.isDirectory else { throw refuse("is \(entry.kindDescription), not a directory") }
        guard entry.uid == 0 || owners?.contains(entry.uid) ?? true else {
            throw refuse("is owned by uid \(entry.uid); it must belong to root or the daemon's user")
        }
        let sticky = entry.mode & S_ISVTX != 0
        if entry.mode & S_IWOTH != 0 && !(sticky && stickyMayBeShared) {
            throw refuse("is writable by every user (mode \(String(entry.mode & 0o7777, radix: 8))); remove that permission (chmod o-w)")
        }
        if entry.mode & S_IWGRP != 0 && !groupMayWrite && !(sticky && stickyMayBeShared) {
            throw refuse("is writable by its group (mode \(String(entry.mode & 0o7777, radix: 8))); remove that permission (chmod g-w)")
        }
    }

    /// Opens an existing file for reading in a way nothing at the path can stall or redirect: a
    /// link is not followed, opening a FIFO does not wait for a writer, and anything but a regular
    /// file is refused. The descriptor is blocking again once it is known to be a regular file.
    ///
    /// - Returns: the descriptor and what `fstat` said, or nil if nothing is at the path.
    public static func openRegularFile(_ path: String) throws(FileSystemError) -> (FileDescriptor, Entry)? {
        let raw: Int32
        do {
            raw = try retryingInterrupts { Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY) }
        } catch {
            if error == .noSuchFileOrDirectory { return nil }
            if error == .tooManySymbolicLinkLevels {
                throw FileSystemError(path: path, operation: "open", kind: .notARegularFile("a symbolic link"))
            }
            throw FileSystemError(path: path, operation: "open", kind: .system(error))
        }
        let descriptor = FileDescriptor(rawValue: raw)
        do throws(FileSystemError) {
            let entry = try entry(of: descriptor, path: path)
            guard entry.isRegularFile else {
                throw FileSystemError(path: path, operation: "open", kind: .notARegularFile(entry.kindDescription))
            }
            return (descriptor, entry)
        } catch {
            descriptor.closeQuietly()
            throw error
        }
    }

    /// Replaces the file at `path` with `contents`, atomically: readers see the old file or the
    /// new one, never part of either, and a crash or a full disk leaves the old one intact.
    ///
    /// The new content goes to a temporary file beside the target with an unpredictable name,
    /// created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`, so no link or FIFO planted there is
    /// followed or opened), given `permissions` through its descriptor, synced, renamed over the
    /// target, and the directory synced. A link at `path` itself is replaced, never followed.
    ///
    /// - Parameters:
    ///   - path: the absolute path of the file to replace.
    ///   - contents: the new content, as pieces written one after another.
    ///   - permissions: the new file's mode bits.
    ///   - durable: `fsync` the file and its directory (a persisted version); false for a file
    ///     that is rewritten every few seconds anyway (metrics).
    public static func replace(_ path: String, with contents: [UnsafeRawBufferPointer], permissions: mode_t,
                               durable: Bool = true) throws(FileSystemError) {
        let (directory, name) = split(path)
        let directoryFD: FileDescriptor
        do {
            directoryFD = FileDescriptor(rawValue: try retryingInterrupts {
                Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            })
        } catch {
            throw FileSystemError(path: directory, operation: "open the directory", kind: .system(error))
        }
        defer { directoryFD.closeQuietly() }
        let temporary = "." + name + "." + randomSuffix() + ".tmp"
        let file: FileDescriptor
        do {
            file = FileDescriptor(rawValue: try retryingInterrupts {
                Glibc.openat(directoryFD.rawValue, temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0o600)
            })
        } catch {
            throw FileSystemError(path: directory + "/" + temporary, operation: "create", kind: .system(error))
        }
        do throws(FileSystemError) {
            do throws(Errno) {
                var offset = 0
                for piece in contents {
                    try file.writeFully(piece, atOffset: offset)
                    offset += piece.count
                }
                _ = try retryingInterrupts { Glibc.fchmod(file.rawValue, permissions) }
                if durable { _ = try retryingInterrupts { Glibc.fsync(file.rawValue) } }
            } catch {
                throw FileSystemError(path: path, operation: "write", kind: .system(error))
            }
            file.closeQuietly()
            do {
                _ = try retryingInterrupts { Glibc.renameat(directoryFD.rawValue, temporary, directoryFD.rawValue, name) }
            } catch {
                throw FileSystemError(path: path, operation: "rename a new version over", kind: .system(error))
            }
        } catch {
            file.closeQuietly()
            _ = Glibc.unlinkat(directoryFD.rawValue, temporary, 0)
            throw error
        }
        // The rename is durable once the directory is synced.
        if durable { _ = Glibc.fsync(directoryFD.rawValue) }
    }

    /// ``replace(_:with:permissions:durable:)`` for content held in arrays.
    public static func replace(_ path: String, with pieces: [[UInt8]], permissions: mode_t, durable: Bool = true) throws(FileSystemError) {
        func write(_ index: Int, _ buffers: [UnsafeRawBufferPointer]) -> Result<Void, FileSystemError> {
            guard index < pieces.count else {
                return Result { () throws(FileSystemError) in try replace(path, with: buffers, permissions: permissions, durable: durable) }
            }
            return pieces[index].withUnsafeBytes { write(index + 1, buffers + [$0]) }
        }
        try write(0, []).get()
    }

    /// Moves the file at `path` aside to `path + suffix`, or `path + suffix + ".N"` with the lowest
    /// N that is free: an earlier copy is never overwritten (a hard link, then an unlink).
    ///
    /// - Returns: the path the file now has.
    @discardableResult
    public static func moveAside(_ path: String, suffix: String) throws(FileSystemError) -> String {
        for attempt in 1...1000 {
            let target = attempt == 1 ? path + suffix : path + suffix + ".\(attempt)"
            do {
                _ = try retryingInterrupts { Glibc.link(path, target) }
            } catch {
                if error == .fileExists { continue }
                throw FileSystemError(path: path, operation: "move aside", kind: .system(error))
            }
            _ = Glibc.unlink(path)
            return target
        }
        throw FileSystemError(path: path, operation: "move aside", kind: .system(.fileExists))
    }

    /// Creates a directory and its missing parents with `permissions` (existing ones are kept,
    /// links to directories followed, as a shell's `mkdir -p` does).
    ///
    /// - Throws: ``FileSystemError`` naming the component that is not a directory, or the one
    ///   that could not be created and why.
    public static func createDirectory(_ path: String, permissions: mode_t) throws(FileSystemError) {
        let probe = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if probe >= 0 {
            _ = Glibc.close(probe)
            return  // a directory already (or a link to one)
        }
        let failure = Errno(rawValue: errno)
        switch failure {
        case .noSuchFileOrDirectory:
            let (parent, _) = split(path)
            if parent != path, parent != "/" { try createDirectory(parent, permissions: permissions) }
            do {
                _ = try retryingInterrupts { Glibc.mkdir(path, permissions) }
            } catch {
                if error == .fileExists { return }
                throw FileSystemError(path: path, operation: "create the directory", kind: .system(error))
            }
        case .notDirectory:
            // The path, or a component on the way to it, exists but is not a directory: name it.
            if let existing = try? entry(at: path) {
                throw FileSystemError(path: path, operation: "use as a directory", kind: .notADirectory(existing.kindDescription))
            }
            let (parent, _) = split(path)
            guard parent != path, parent != "/" else {
                throw FileSystemError(path: path, operation: "use as a directory", kind: .system(failure))
            }
            try createDirectory(parent, permissions: permissions)
            throw FileSystemError(path: path, operation: "use as a directory", kind: .system(failure))
        default:
            throw FileSystemError(path: path, operation: "open the directory", kind: .system(failure))
        }
    }

    /// Whether the calling process may write in `path` (`access(W_OK)`).
    public static func isWritable(_ path: String) -> Bool { Glibc.access(path, W_OK) == 0 }

    /// Removes the name `path` (`unlink`); nothing if it does not exist.
    public static func remove(_ path: String) { _ = Glibc.unlink(path) }

    /// Sets a path's mode bits (`chmod`).
    public static func setPermissions(_ path: String, _ permissions: UInt32) throws(FileSystemError) {
        do {
            _ = try retryingInterrupts { Glibc.chmod(path, permissions) }
        } catch {
            throw FileSystemError(path: path, operation: "set the mode of", kind: .system(error))
        }
    }

    /// Sets a path's owner and group (`chown`); nil leaves one as it is.
    public static func setOwner(_ path: String, user: UInt32?, group: UInt32?) throws(FileSystemError) {
        do {
            _ = try retryingInterrupts { Glibc.chown(path, user ?? UInt32.max, group ?? UInt32.max) }
        } catch {
            throw FileSystemError(path: path, operation: "set the owner of", kind: .system(error))
        }
    }

    /// The directory and last component of a path (`/a/b` → `/a`, `b`).
    public static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    static func randomSuffix() -> String {
        var generator = SystemRandomNumberGenerator()
        return String(generator.next() as UInt64, radix: 36)
    }
}

/// The process's resource limits.
public enum ResourceLimits {
    /// The soft and hard limit on open descriptors (`RLIMIT_NOFILE`); nil for the soft limit
    /// when it is unlimited.
    public static func openFiles() -> (current: Int?, maximum: Int?) {
        var limit = rlimit()
        guard Glibc.getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return (nil, nil) }
        func value(_ raw: rlim_t) -> Int? { raw == rlim_t.max ? nil : Int(clamping: raw) }
        return (value(limit.rlim_cur), value(limit.rlim_max))
    }

    /// Raises the soft descriptor limit to the hard one; returns the new soft limit.
    @discardableResult
    public static func raiseOpenFilesToMaximum() -> Int? {
        var limit = rlimit()
        guard Glibc.getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = Glibc.setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        return openFiles().current
    }
}
