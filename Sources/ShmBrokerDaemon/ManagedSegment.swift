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
