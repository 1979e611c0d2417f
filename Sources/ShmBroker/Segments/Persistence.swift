import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Persistent segments (`"persist": true`): the directory, restoring at creation, and saving
/// changed versions off the loop. See ``SegmentArchive`` for the file format.
extension BrokerServer {
    // MARK: Persistence

    /// Creates the directory of saved segments (0700) if needed, and checks that nobody the
    /// daemon does not trust can plant or replace files in it; a config with persistent segments
    /// does not start without one.
    func preparePersistenceDirectory() throws {
        let directory = configuration.persistence.directory
        do {
            try FileSystem.createDirectory(directory, permissions: 0o700)
            try FileSystem.checkTrustedDirectory(directory, owners: [daemonUID])
        } catch {
            throw DaemonError.persistence("the persistence directory cannot be used: \(error) (set StateDirectory= in the unit, or persistence.directory)")
        }
        guard FileSystem.isWritable(directory) else {
            throw DaemonError.persistence("the persistence directory \(directory) is not writable by uid \(daemonUID) (set StateDirectory= in the unit, or persistence.directory)")
        }
    }

    /// Brings back the saved version of a new persistent segment, with its number and time. A
    /// file that fails its checks is logged, moved aside (`.rejected`, every copy kept) and not
    /// served; a file that cannot be read is logged and left where it is.
    func restoreFromDisk(_ segment: ManagedSegment) {
        guard segment.definition.persists else { return }
        do {
            guard let saved = try archive.load(segment.name, capacity: segment.definition.capacity) else { return }
            // A file older than the newest save (a backup put back, a disk image rolled back): its
            // content is served, but as a version after the newest one readers may have seen, so
            // that versions never go backwards; and the rollback is said loudly.
            var version = saved.version
            if let highest = archive.highestSaved(segment.name), highest > saved.version,
               highest < SegmentArchive.highestContinuableVersion {
                version = highest + 1
                logger.error("rollback: the saved segment is older than the newest version saved; serving its content as a new version", metadata: [
                    "segment": "\(segment.name)", "savedVersion": "\(saved.version)", "newestSaved": "\(highest)",
                    "servedAs": "\(version)", "file": "\(archive.path(of: segment.name))",
                ])
            }
            _ = try saved.bytes.withUnsafeBytes { bytes throws(SegmentError) in
                try segment.writer.restore(bytes, version: version, expectedCRC: saved.crc64,
                                           publishedAtNanoseconds: saved.publishedAtNanoseconds)
            }
            segment.saves.savedVersion.store(saved.version == version ? version : 0, ordering: .relaxed)
            logger.info("segment restored from disk", metadata: [
                "segment": "\(segment.name)", "version": "\(version)", "bytes": "\(saved.bytes.count)",
            ])
        } catch let failure as SegmentArchive.Failure where !failure.movesFileAside {
            segment.saves.keepsUnreadableFile.store(true, ordering: .relaxed)
            logger.error("saved segment unreadable; starting it empty, leaving the file in place and not saving over it until a restart", metadata: [
                "segment": "\(segment.name)", "error": "\(failure)"])
        } catch {
            do {
                let aside = try archive.reject(segment.name)
                logger.error("saved segment rejected; starting it empty", metadata: [
                    "segment": "\(segment.name)", "error": "\(error)", "movedTo": "\(aside)"])
            } catch let moveError {
                logger.error("saved segment rejected; starting it empty", metadata: [
                    "segment": "\(segment.name)", "error": "\(error)", "moveAside": "\(moveError)"])
            }
        }
    }

    /// Saves persistent segments whose version changed since their last successful save: the
    /// ones the ``PersistenceSink`` heard of, or every persistent segment when `synchronously`
    /// (on stop, when the file is also written right here). The snapshot is taken on the loop (a
    /// verified read), the file written on the persistence queue. A version counts as saved only
    /// once its file is written, so a segment stays on the sink's list, and a failed save is
    /// tried again at the next round, and on stop.
    func savePersistentSegments(synchronously: Bool) {
        loop.assertOnLoop()
        let archive = self.archive
        let candidates = synchronously ? segments.ordered.filter(\.definition.persists)
            : persistence.changed.compactMap { segments[$0] }
        for segment in candidates {
            let saves = segment.saves
            let version = segment.writer.latestVersion
            if version == saves.savedVersion.load(ordering: .acquiring) || saves.keepsUnreadableFile.load(ordering: .relaxed) {
                persistence.changed.remove(segment.name)
                continue
            }
            guard version != 0,
                  !saves.inFlight.load(ordering: .acquiring) else { continue }
            guard let reader = try? SegmentReader(region: segment.writer.region), let snapshot = try? reader.read() else { continue }
            saves.inFlight.store(true, ordering: .releasing)
            let logger = self.logger, name = segment.name
            let work: @Sendable () -> Void = {
                defer { saves.inFlight.store(false, ordering: .releasing) }
                do {
                    try archive.save(name, snapshot)
                    saves.savedVersion.store(snapshot.version, ordering: .releasing)
                    let failed = saves.failures.exchange(0, ordering: .relaxed)
                    if failed > 0 {
                        logger.notice("persistent segment saved again", metadata: [
                            "segment": "\(name)", "version": "\(snapshot.version)", "failedAttempts": "\(failed)"])
                    }
                } catch {
                    // Logged on the first failure and then every tenth, with the count; retried
                    // every round.
                    let failed = saves.failures.wrappingIncrementThenLoad(ordering: .relaxed)
                    if failed == 1 || failed % 10 == 0 || synchronously {
                        logger.error("saving a persistent segment failed; it will be retried", metadata: [
                            "segment": "\(name)", "version": "\(snapshot.version)", "error": "\(error)",
                            "failedAttempts": "\(failed)"])
                    }
                }
            }
            if synchronously { work() } else { persistence.queue.async(execute: work) }
        }
    }

}

/// The version sink of persistence: it notes which persistent segments have a version not yet
/// saved, so that each round (`persistence.intervalSeconds`) visits only those.
final class PersistenceSink: VersionSink {
    /// Saves run here, off the loop; the loop only takes the snapshot.
    let queue = DispatchQueue(label: "shmbroker.persistence")
    /// Persistent segments with a version that may not be saved yet; a segment leaves the set
    /// once its saved version is its latest.
    var changed: Set<String> = []

    func versionCommitted(_ receipt: PublishReceipt, to segment: ManagedSegment, origin: VersionOrigin) {
        if segment.definition.persists { changed.insert(segment.name) }
    }
}
