import Foundation

extension BrokerConfiguration {
    /// Where a configuration built in code is said to come from, in its problems.
    public static let inCodeSource = "the configuration built in code"

    /// Checks a configuration built in code with exactly the rules and messages of a config file:
    /// it is written out as the JSON a file would hold and read back through the same checker,
    /// so a segment name the file would refuse, a size of 0, a duplicate name or a socket path too
    /// long for a Unix socket are reported the same way, with JSON paths (`$.segments[1].size`).
    ///
    /// - Returns: the configuration as the checker read it back (identical when it is valid).
    /// - Throws: ``ConfigurationError`` listing every problem.
    public func validated() throws(ConfigurationError) -> BrokerConfiguration {
        let data: Data
        do {
            data = try JSONSerialization.data(withJSONObject: jsonObject, options: [.sortedKeys])
        } catch {
            throw ConfigurationError(file: Self.inCodeSource, problems: [ConfigurationProblem(path: "$", message: "cannot be written as JSON: \(error)")])
        }
        return try Self.parse(Array(data), file: Self.inCodeSource, environment: [:])
    }

    /// The configuration as a config file would hold it.
    var jsonObject: [String: Any] {
        var socketObject: [String: Any] = ["path": socket.path, "mode": String(socket.mode, radix: 8)]
        if let owner = socket.owner { socketObject["user"] = owner }
        if let group = socket.group { socketObject["group"] = group }
        var limitsObject: [String: Any] = ["maxClients": limits.maximumClients,
                                           "subscriberStallTimeoutSeconds": limits.subscriberStallTimeoutSeconds]
        if let perUser = limits.configuredMaximumClientsPerUser { limitsObject["maxClientsPerUser"] = perUser }
        if let reserved = limits.configuredReservedClients { limitsObject["reservedClients"] = reserved }
        var metricsObject: [String: Any] = ["intervalSeconds": metrics.intervalSeconds, "textfileMode": String(metrics.textfileMode, radix: 8)]
        if let textfile = metrics.textfile { metricsObject["textfile"] = textfile }
        func access(_ list: AccessList) -> [String: Any] {
            ["users": (list.everyone ? ["*"] : []) + list.users.sorted().map { $0 as Any }, "groups": list.groups.sorted()]
        }
        return [
            "socket": socketObject,
            "limits": limitsObject,
            "metrics": metricsObject,
            "persistence": ["directory": persistence.directory, "intervalSeconds": persistence.intervalSeconds],
            "segments": segments.map { segment -> [String: Any] in
                ["name": segment.name, "size": segment.capacity, "slots": segment.slots, "reserve": segment.reservesMemory,
                 "persist": segment.persists, "readers": access(segment.readers), "publishers": access(segment.publishers)]
            },
        ]
    }
}
