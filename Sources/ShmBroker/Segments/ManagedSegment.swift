import Atomics
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import SystemPackage

/// A segment the daemon owns: its memfd, its writable mapping, its writer, and who uses it.
final class ManagedSegment {
    private(set) var definition: SegmentDefinition
    /// The daemon's read-write descriptor; readers get read-only reopenings of it.
    let memoryFile: FileDescriptor
    /// The wait board's memfd (``SegmentLayout/WaitBoard``); readers get it writable.
    let boardFile: FileDescriptor
    /// What is on disk for this segment (persistent segments only), shared with the persistence
    /// queue that writes the files.
    let saves = SaveRecord()
    /// The version the timer's wake-up backstop last saw (see ``SegmentWriter/wakeAllWaiters()``).
    var versionAtLastBackstop: UInt64 = 0
    let writer: SegmentWriter
    /// Clients subscribed to version events.
    var subscribers: Set<UInt64> = [] {
        didSet { signals.subscriberCount.store(subscribers.count, ordering: .relaxed) }
    }
    /// What an in-process publisher and the event loop tell each other about this segment.
    let signals = SegmentSignals()
    /// The application's publisher, when the owner process publishes this segment itself:
    /// clients may then read it but not publish to it.
    var owner: OwnedSegment?
    /// The last version announced to subscribers for an owner-published segment.
    var lastAnnouncedVersion: UInt64 = 0
    /// Clients that have opened (mapped) the segment.
    var readers: Set<UInt64> = []
    /// Where a mirrored segment's versions come from, as the mirror last reported it.
    var mirror: MirrorState?

    var name: String { definition.name }

    /// Creates, sizes, seals and formats a new segment.
    init(creating definition: SegmentDefinition) throws {
        self.definition = definition
        let layout = definition.layout
        do {
            memoryFile = try MemoryFile.create(name: "shmbroker:\(definition.name)", size: layout.totalSize,
                                               reserve: definition.reservesMemory)
        } catch {
            throw MemoryBudget.Shortage.cannotReserve(segment: definition.name, bytes: UInt64(layout.totalSize), error: error)
        }
        do {
            boardFile = try MemoryFile.create(name: "shmbroker-board:\(definition.name)", size: SegmentLayout.WaitBoard.size, mode: 0o600)
        } catch {
            memoryFile.closeQuietly()
            throw error
        }
        do {
            let region = try MappedRegion(mapping: memoryFile, length: layout.totalSize, writable: true)
            let board = try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true)
            writer = SegmentWriter(formatting: region, layout: layout, name: definition.name, board: board)
        } catch {
            memoryFile.closeQuietly()
            boardFile.closeQuietly()
            throw error
        }
    }

    /// Takes back a segment memfd from systemd's fd store, checking its header and the CRC of its
    /// current version. Content and version carry on; existing reader mappings keep working.
    ///
    /// - Throws: ``SegmentError`` if the memory is not a valid segment, or ``AdoptionError`` if
    ///   its layout differs from the definition (the caller then recreates it).
    init(adopting memoryFile: FileDescriptor, board storedBoard: FileDescriptor?, definition: SegmentDefinition) throws {
        let size = try memoryFile.fileSize()
        let region = try MappedRegion(mapping: memoryFile, length: size, writable: true)
        // The earlier run's board, so readers already asleep stay counted; a new one if it is
        // missing or not a board (then the timer's backstop wakes any old sleeper).
        var boardFile = storedBoard
        if let candidate = boardFile, (try? candidate.fileSize()) != SegmentLayout.WaitBoard.size {
            candidate.closeQuietly()
            boardFile = nil
        }
        let board: FileDescriptor
        if let boardFile {
            board = boardFile
        } else {
            board = try MemoryFile.create(name: "shmbroker-board:\(definition.name)", size: SegmentLayout.WaitBoard.size, mode: 0o600)
        }
        let writer: SegmentWriter
        do {
            let boardRegion = try MappedRegion(mapping: board, length: SegmentLayout.WaitBoard.size, writable: true)
            writer = try SegmentWriter(adopting: region, board: boardRegion)
        } catch {
            board.closeQuietly()
            throw error
        }
        guard writer.layout == definition.layout else {
            throw AdoptionError.layoutChanged(stored: writer.layout, configured: definition.layout, writer: writer)
        }
        self.definition = definition
        self.memoryFile = memoryFile
        self.boardFile = board
        self.writer = writer
    }

    /// Why a stored segment could not be taken over as it is.
    enum AdoptionError: Error, CustomStringConvertible {
        /// Valid, but the config now asks for another capacity or slot count, or the segment
        /// comes from a writer without block checksum tables (an upgrade).
        case layoutChanged(stored: SegmentLayout, configured: SegmentLayout, writer: SegmentWriter)

        var description: String {
            switch self {
            case let .layoutChanged(stored, configured, _):
                func shape(_ layout: SegmentLayout) -> String {
                    "capacity \(layout.capacity), \(layout.slotCount) slots, "
                        + (layout.hasBlockChecksums ? "checksum blocks of \(layout.checksumBlockSize) bytes" : "no block checksums")
                }
                return "stored layout (\(shape(stored))) differs from the config's (\(shape(configured)))"
            }
        }
    }

    /// The name under which the memfd lives in systemd's fd store.
    var storeName: String { InheritedDescriptors.segmentNamePrefix + name }
    /// The name under which the wait board lives in systemd's fd store.
    var boardStoreName: String { InheritedDescriptors.boardNamePrefix + name }

    /// Applies a changed access policy; content and version are untouched.
    func updateAccess(from newDefinition: SegmentDefinition) {
        precondition(newDefinition.layout == definition.layout && newDefinition.name == definition.name)
        definition = newDefinition
    }

    /// A new read-only descriptor for a reader.
    func readOnlyDescriptor() throws(Errno) -> FileDescriptor {
        try MemoryFile.readOnlyDuplicate(of: memoryFile)
    }

    /// A descriptor of the wait board for a reader: read-write (readers count themselves in it),
    /// sealed against resizing, so a reader can neither make the writer fault nor touch the segment.
    func boardDescriptor() throws(Errno) -> FileDescriptor {
        try boardFile.duplicateClosingOnExec()
    }

    /// Marks the segment retired for every mapping reader and closes the daemon's descriptor.
    /// Readers' mappings stay valid; the memory is freed when the last one is unmapped.
    func retire() {
        writer.retire()
        memoryFile.closeQuietly()
        boardFile.closeQuietly()
    }
}

/// Shared between the event loop and an owner's publishing thread (the only state they share
/// besides the segment memory itself).
final class SegmentSignals: Sendable {
    /// Subscribers the loop serves; a publisher asks the loop to announce only when there are any.
    let subscriberCount = ManagedAtomic<Int>(0)
    /// Set by the publisher after a publish, cleared by the loop before it announces the latest
    /// version: one doorbell ring per burst of publishes, however many there are.
    let announcePending = ManagedAtomic<Bool>(false)
}

/// The saves of one persistent segment, shared between the event loop (which decides what to
/// save) and the persistence queue (which writes it): a version counts as saved only once its
/// file is on disk, so a failed save (a full disk) is tried again at the next round and on stop.
final class SaveRecord: Sendable {
    /// The version whose file is on disk (0: none yet).
    let savedVersion = ManagedAtomic<UInt64>(0)
    /// Whether a save is queued or being written: the loop starts no second one meanwhile.
    let inFlight = ManagedAtomic<Bool>(false)
    /// Saves that failed since the last one that succeeded.
    let failures = ManagedAtomic<Int>(0)
    /// Set when the saved file could not be read at start: it is left where it is, and never
    /// saved over, until the owner restarts (after someone repaired or removed it).
    let keepsUnreadableFile = ManagedAtomic<Bool>(false)
}
