import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage

/// A segment the daemon owns: its memfd, its writable mapping, its writer, and who uses it.
final class ManagedSegment {
    private(set) var definition: SegmentDefinition
    /// The daemon's read-write descriptor; readers get read-only reopenings of it.
    let memoryFile: FileDescriptor
    let writer: SegmentWriter
    /// Clients subscribed to version events.
    var subscribers: Set<UInt64> = []
    /// Clients that have opened (mapped) the segment.
    var readers: Set<UInt64> = []

    var name: String { definition.name }

    /// Creates, sizes, seals and formats a new segment.
    init(creating definition: SegmentDefinition) throws {
        self.definition = definition
        let layout = definition.layout
        memoryFile = try MemoryFile.create(name: "shmbroker:\(definition.name)", size: layout.totalSize)
        do {
            let region = try MappedRegion(mapping: memoryFile, length: layout.totalSize, writable: true)
            writer = SegmentWriter(formatting: region, layout: layout, name: definition.name)
        } catch {
            memoryFile.closeQuietly()
            throw error
        }
    }

    /// Takes back a segment memfd from systemd's fd store, checking its header and the CRC of its
    /// current version. Content and version carry on; existing reader mappings keep working.
    ///
    /// - Throws: ``SegmentError`` if the memory is not a valid segment, or ``AdoptionError`` if
    ///   its layout differs from the definition (the caller then recreates it).
    init(adopting memoryFile: FileDescriptor, definition: SegmentDefinition) throws {
        let size = try memoryFile.fileSize()
        let region = try MappedRegion(mapping: memoryFile, length: size, writable: true)
        let writer = try SegmentWriter(adopting: region)
        guard writer.layout == definition.layout else {
            throw AdoptionError.layoutChanged(stored: writer.layout, configured: definition.layout, writer: writer)
        }
        self.definition = definition
        self.memoryFile = memoryFile
        self.writer = writer
    }

    /// Why a stored segment could not be taken over as it is.
    enum AdoptionError: Error, CustomStringConvertible {
        /// Valid, but the config now asks for another capacity or slot count.
        case layoutChanged(stored: SegmentLayout, configured: SegmentLayout, writer: SegmentWriter)

        var description: String {
            switch self {
            case let .layoutChanged(stored, configured, _):
                return "stored layout (capacity \(stored.capacity), \(stored.slotCount) slots) differs from the config (capacity \(configured.capacity), \(configured.slotCount) slots)"
            }
        }
    }

    /// The name under which the memfd lives in systemd's fd store.
    var storeName: String { InheritedDescriptors.segmentNamePrefix + name }

    /// Applies a changed access policy; content and version are untouched.
    func updateAccess(from newDefinition: SegmentDefinition) {
        precondition(newDefinition.layout == definition.layout && newDefinition.name == definition.name)
        definition = newDefinition
    }

    /// A new read-only descriptor for a reader.
    func readOnlyDescriptor() throws(Errno) -> FileDescriptor {
        try MemoryFile.readOnlyDuplicate(of: memoryFile)
    }

    /// Marks the segment retired for every mapping reader and closes the daemon's descriptor.
    /// Readers' mappings stay valid; the memory is freed when the last one is unmapped.
    func retire() {
        writer.retire()
        memoryFile.closeQuietly()
    }
}
