/// The publish rings producers attached, by id, and the ones that still had entries after their
/// last batch (the loop polls those instead of sleeping). The event loop owns it.
final class RingSet {
    private var byID: [UInt64: AttachedRing] = [:]
    private var nextID: UInt64 = 1
    private var active: [UInt64] = []

    subscript(id: UInt64) -> AttachedRing? { byID[id] }
    var values: Dictionary<UInt64, AttachedRing>.Values { byID.values }
    /// Whether a ring has entries left after its last batch.
    var hasActive: Bool { !active.isEmpty }
    /// When a ring last delivered an entry (monotonic ns): a daemon configured to spin on its
    /// rings keeps polling them for `publishRings.spinMicroseconds` after it.
    var lastEntryAt: UInt64 = 0
    /// Whether the loop is polling the rings (their idle flags stay clear meanwhile).
    var isSpinning = false
    /// Whether no ring is attached.
    var isEmpty: Bool { byID.isEmpty }

    /// The id the next ring gets.
    func takeID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }

    func add(_ ring: AttachedRing) { byID[ring.token] = ring }

    func remove(_ ring: AttachedRing) {
        byID.removeValue(forKey: ring.token)
        active.removeAll { $0 == ring.token }
    }

    /// Marks a ring as having entries left (once).
    func markActive(_ ring: AttachedRing) {
        guard !ring.isActive else { return }
        ring.isActive = true
        active.append(ring.token)
    }

    /// The rings marked active, unmarked: the caller drains each once more.
    func takeActive() -> [AttachedRing] {
        let rings = active.compactMap { byID[$0] }
        active.removeAll(keepingCapacity: true)
        rings.forEach { $0.isActive = false }
        return rings
    }
}
