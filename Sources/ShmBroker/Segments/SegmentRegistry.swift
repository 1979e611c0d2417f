/// The configured segments, by name and in the configuration's order, and the ones an embedding
/// application claimed. It alone adds and removes segments; the event loop owns it.
final class SegmentRegistry {
    private var byName: [String: ManagedSegment] = [:]
    /// Segment names in the configuration's order (STATUS and the metrics list them so).
    private(set) var order: [String] = []
    /// Every segment an embedding application claimed, also after a reload retired it.
    private(set) var owned: [OwnedSegment] = []
    /// Segment memfds and wait boards an earlier run left in systemd's fd store: taken when
    /// their segment is created at start, the rest dropped once start has created every segment.
    var stored = InheritedDescriptors()

    subscript(name: String) -> ManagedSegment? { byName[name] }

    var count: Int { byName.count }
    /// The segments in no particular order.
    var values: Dictionary<String, ManagedSegment>.Values { byName.values }
    /// The segments in the configuration's order.
    var ordered: [ManagedSegment] { order.compactMap { byName[$0] } }

    /// Adds a segment at the end of the order, or replaces the one of the same name in place.
    func add(_ segment: ManagedSegment) {
        if byName.updateValue(segment, forKey: segment.name) == nil { order.append(segment.name) }
    }

    /// Takes a segment out of the registry; nil if there was none of that name.
    func remove(named name: String) -> ManagedSegment? {
        guard let segment = byName.removeValue(forKey: name) else { return nil }
        order.removeAll { $0 == name }
        return segment
    }

    /// Puts the segments in the order a reload's configuration gives.
    func reorder(_ names: [String]) {
        order = names.filter { byName[$0] != nil }
    }

    /// Records a segment the application claimed (once).
    func recordClaim(_ segment: OwnedSegment) {
        if !owned.contains(where: { $0 === segment }) { owned.append(segment) }
    }
}
