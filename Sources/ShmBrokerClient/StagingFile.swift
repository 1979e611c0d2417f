import ShmBrokerPlatform
import SystemPackage

/// A producer's reusable memfd for payloads too large to travel inline, kept mapped so that a
/// publish is one `memcpy` into memory the daemon can map too: no `write` syscall, no page-cache
/// locking per page, no fresh pages to allocate and zero after the first use.
///
/// The file is sealed against shrinking (the daemon then maps it without any SIGBUS risk) and
/// only ever grows. One publish uses it at a time; it is reused only after the daemon replied.
final class StagingFile: @unchecked Sendable {
    let descriptor: FileDescriptor
    private var mapping: MappedRegion?

    init() throws(Errno) {
        descriptor = try MemoryFile.createScratch(name: "shmbroker-publish", sealedAgainstShrinking: true)
    }

    /// Bytes the file can hold without growing.
    var capacity: Int { mapping?.length ?? 0 }

    /// Makes the file hold `bytes` from offset 0, growing it (to the next power of two of at
    /// least 64 KiB) when they do not fit. Bytes beyond `bytes.count` are left from earlier
    /// payloads; the request's length tells the daemon where this one ends.
    func store(_ bytes: UnsafeRawBufferPointer) throws(Errno) {
        if bytes.count > capacity {
            let size = max(64 << 10, 1 << (Int.bitWidth - (bytes.count - 1).leadingZeroBitCount))
            mapping = nil
            try descriptor.setSize(size)
            mapping = try MappedRegion(mapping: descriptor, length: size, writable: true)
        }
        guard let mapping, let source = bytes.baseAddress else { return }
        mapping.base.copyMemory(from: source, byteCount: bytes.count)
    }

    func close() {
        mapping = nil
        descriptor.closeQuietly()
    }
}
