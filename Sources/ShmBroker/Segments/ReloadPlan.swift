import ShmBrokerConfig

/// What a reload changes, decided from the running segments and the new configuration alone, so
/// that the decision is tested apart from the memory and sockets it acts on.
struct ReloadPlan: Equatable {
    /// Segments the new configuration names for the first time, in its order.
    var added: [SegmentDefinition] = []
    /// Segments whose layout (capacity or slots) changed: recreated, the last version carried over.
    var resized: [SegmentDefinition] = []
    /// Segments the new configuration no longer names, in the running order.
    var retired: [String] = []
    /// Segments whose layout is kept but whose access lists or flags changed.
    var updated: [SegmentDefinition] = []
    /// The segments' order after the reload (the new configuration's).
    var order: [String] = []
    /// Segments the reload must create (new memory): the added and the resized, in the new
    /// configuration's order.
    var toCreate: [SegmentDefinition] = []

    /// Compares the running segments (in their order) with the new configuration's.
    init(running: [SegmentDefinition], new: [SegmentDefinition]) {
        let current = Dictionary(running.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let wanted = Set(new.map(\.name))
        retired = running.map(\.name).filter { !wanted.contains($0) }
        for definition in new {
            guard let old = current[definition.name] else {
                added.append(definition)
                toCreate.append(definition)
                continue
            }
            if old.layout != definition.layout {
                resized.append(definition)
                toCreate.append(definition)
            } else if old != definition {
                updated.append(definition)
            }
        }
        order = new.map(\.name)
    }

    /// Whether the reload changes nothing about the segments.
    var isEmpty: Bool { added.isEmpty && resized.isEmpty && retired.isEmpty && updated.isEmpty }
}
