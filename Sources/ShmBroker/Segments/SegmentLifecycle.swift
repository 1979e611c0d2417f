import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The segment registry's life cycle: creating segments (or taking them back from the fd store),
/// checking that they fit the descriptor limit, retiring them, and reloading the configuration.
/// Everything here runs on the event loop's thread.
extension BrokerServer {
    /// Descriptors the daemon needs besides one per segment and one per client: epoll, signalfd,
    /// timer, listener, standard streams, the notify socket, and room for replies in flight.
    static let descriptorHeadroom = 64

    /// Each segment holds a descriptor (its memfd) and each client one (its socket): a config
    /// whose segments alone do not fit `RLIMIT_NOFILE` is refused, naming the numbers; one whose
    /// segments plus `maxClients` do not fit is logged, since the client limit cannot then be
    /// reached.
    func checkDescriptorBudget(_ configuration: BrokerConfiguration, context: String) throws {
        guard let available = ResourceLimits.openFiles().current else { return }
        let segmentCount = configuration.segments.count
        // On reload the running segments stay open until the new ones exist.
        // Two per segment: its memfd and its wait board.
        let during = 2 * (context == "reload" ? segmentCount + segments.count : segmentCount)
        guard during + Self.descriptorHeadroom <= available else {
            throw DaemonError.descriptorLimit(segments: segmentCount, needed: during + Self.descriptorHeadroom, limit: available)
        }
        let wanted = 2 * segmentCount + configuration.limits.maximumClients + Self.descriptorHeadroom
        if wanted > available {
            logger.warning("the descriptor limit is below what the config can use", metadata: [
                "segments": "\(segmentCount)", "maxClients": "\(configuration.limits.maximumClients)",
                "needed": "\(wanted)", "rlimitNofile": "\(available)",
                "hint": "raise LimitNOFILE= in the unit or lower limits.maxClients",
            ])
        }
    }

    /// Takes a segment back from the fd store if an earlier run stored it, else creates it.
    /// A stored segment that fails its checks is logged and recreated empty, never served.
    func restoreOrCreate(_ definition: SegmentDefinition) throws -> ManagedSegment {
        let storedBoard = segments.stored.boards.removeValue(forKey: definition.name)
        guard let stored = segments.stored.segments.removeValue(forKey: definition.name) else {
            storedBoard?.closeQuietly()
            let segment = try ManagedSegment(creating: definition)
            restoreFromDisk(segment)
            storeInSystemd(segment)
            return segment
        }
        do {
            let segment = try ManagedSegment(adopting: stored, board: storedBoard, definition: definition)
            if segment.boardFile != storedBoard { notifier.store(segment.boardFile, name: segment.boardStoreName) }
            logger.info("segment restored from the fd store", metadata: [
                "segment": "\(definition.name)", "version": "\(segment.writer.latestVersion)",
            ])
            return segment
        } catch {
            let replacement = try ManagedSegment(creating: definition)
            if case ManagedSegment.AdoptionError.layoutChanged(_, _, let oldWriter) = error {
                carryOver(from: oldWriter, to: replacement)
                logger.notice("stored segment resized per the config", metadata: ["segment": "\(definition.name)", "detail": "\(error)"])
            } else {
                logger.error("stored segment failed its checks; recreated empty", metadata: [
                    "segment": "\(definition.name)", "error": "\(error)",
                ])
            }
            stored.closeQuietly()
            notifier.removeStored(name: replacement.storeName)
            notifier.removeStored(name: replacement.boardStoreName)
            storeInSystemd(replacement)
            return replacement
        }
    }


    /// Puts a segment's memfd and wait board in systemd's fd store, so a restart keeps both.
    func storeInSystemd(_ segment: ManagedSegment) {
        notifier.store(segment.memoryFile, name: segment.storeName)
        notifier.store(segment.boardFile, name: segment.boardStoreName)
    }

    // MARK: Segments

    func addSegment(_ segment: ManagedSegment) {
        loop.assertOnLoop()
        segments.add(segment)
        // A segment restored from the fd store (or served as a newer version after a rollback)
        // may hold a version its file does not: the next persistence round looks.
        if segment.definition.persists { persistence.changed.insert(segment.name) }
    }

    func retireSegment(named name: String) {
        loop.assertOnLoop()
        guard let segment = segments.remove(named: name) else { return }
        persistence.changed.remove(name)
        if let owned = segment.owner {
            owned.exclusively { owned.bind(writer: nil, signals: nil) }
            logger.notice("owned segment removed from the config; its publishes now fail", metadata: ["segment": "\(name)"])
        }
        segment.retire()
        notifier.removeStored(name: segment.storeName)
        notifier.removeStored(name: segment.boardStoreName)
        let event = ServerMessage.retiredEvent(segment: name).encode(requestID: 0)
        for id in segment.subscribers.union(segment.readers) {
            guard let client = clients[id] else { continue }
            client.subscriptions.remove(name)
            client.opened.remove(name)
            client.removePending(name)
            send(event, to: client)
        }
    }

    /// SIGHUP: re-reads the config. New segments appear, removed ones are retired, unchanged
    /// ones keep their content and version; an invalid file leaves everything as it was.
    func reload() {
        loop.assertOnLoop()
        guard !identity.configPath.isEmpty else {
            logger.notice("SIGHUP ignored: the configuration was built in code, there is no file to re-read")
            return
        }
        notifier.reloading(status: "reloading \(identity.configPath)")
        logger.notice("reloading configuration", metadata: ["path": "\(identity.configPath)"])
        let newConfiguration: BrokerConfiguration
        do {
            newConfiguration = try BrokerConfiguration.load(path: identity.configPath)
        } catch {
            counters.failedReloads += 1
            for problem in error.problems { logger.error("config rejected: \(problem)") }
            logger.error("reload failed; keeping the running configuration", metadata: ["problems": "\(error.problems.count)"])
            notifier.ready(status: "reload failed (\(error.problems.count) problems, see journal); " + statusLine())
            return
        }
        if newConfiguration.socket != configuration.socket {
            logger.warning("socket settings changed; they take effect on restart")
        }
        do {
            try checkDescriptorBudget(newConfiguration, context: "reload")
        } catch {
            counters.failedReloads += 1
            logger.error("reload rejected; keeping the running configuration", metadata: ["error": "\(error)"])
            notifier.ready(status: "reload failed (\(error)); " + statusLine())
            return
        }
        let plan = ReloadPlan(running: segments.ordered.map(\.definition), new: newConfiguration.segments)
        var created: [ManagedSegment] = []
        do {
            try MemoryBudget.check(plan.toCreate)
            for definition in plan.toCreate { created.append(try ManagedSegment(creating: definition)) }
        } catch {
            created.forEach { $0.retire() }
            counters.failedReloads += 1
            logger.error("reload failed creating a segment; keeping the running configuration", metadata: ["error": "\(error)"])
            notifier.ready(status: "reload failed (\(error)); " + statusLine())
            return
        }
        for name in plan.retired {
            logger.notice("segment removed", metadata: ["segment": "\(name)"])
            retireSegment(named: name)
        }
        for segment in created {
            if let old = segments[segment.name], let owned = old.owner {
                // The application's publisher moves to the new segment with publishes excluded,
                // so no version lands in the old one after its content was carried over.
                owned.exclusively {
                    carryOver(from: old.writer, to: segment)
                    owned.bind(writer: segment.writer, signals: segment.signals)
                }
                segment.owner = owned
                old.owner = nil
                logger.notice("owned segment resized", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                retireSegment(named: segment.name)
            } else if let old = segments[segment.name] {
                carryOver(from: old.writer, to: segment)
                logger.notice("segment resized", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                retireSegment(named: segment.name)
            } else {
                logger.notice("segment added", metadata: ["segment": "\(segment.name)", "capacity": "\(segment.definition.capacity)"])
                restoreFromDisk(segment)
            }
            addSegment(segment)
            storeInSystemd(segment)
        }
        for definition in plan.updated {
            segments[definition.name]?.updateAccess(from: definition)
        }
        segments.reorder(plan.order)
        configuration.limits = newConfiguration.limits
        configuration.segments = newConfiguration.segments
        configuration.publishRings = newConfiguration.publishRings
        // Rings of removed segments (or of producers no longer allowed) are detached now, with
        // the reason; the others learn their segment's capacity, which may have changed.
        for ring in Array(rings.values) { _ = currentSegment(of: ring) }
        counters.reloads += 1
        notifier.ready(status: statusLine())
        logger.notice("reloaded", metadata: ["segments": "\(segments.count)"])
    }

    /// A resized segment (or one a writer without block checksum tables left in the fd store)
    /// starts over, keeping the old content, version number and publish time when it fits.
    func carryOver(from old: SegmentWriter, to new: ManagedSegment) {
        let reader = try? SegmentReader(region: old.region)
        guard let snapshot = try? reader?.read(), snapshot.bytes.count <= new.definition.capacity else { return }
        // Under its own number and time: a reader that reopens sees the version it had, not a 1.
        _ = try? pipeline.commit(to: new, origin: .carryOver) { writer throws(SegmentError) in
            try snapshot.bytes.withUnsafeBytes { bytes in
                Result { () throws(SegmentError) in
                    try writer.restore(bytes, version: snapshot.version, expectedCRC: snapshot.crc64,
                                       publishedAtNanoseconds: snapshot.publishedAtNanoseconds)
                }
            }.get()
        }
    }
}
