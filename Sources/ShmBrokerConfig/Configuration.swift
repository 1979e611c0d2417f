import Foundation
import ShmBrokerCore
import ShmBrokerPlatform

/// Who may do something with a segment: explicit uids and gids, or everyone.
///
/// Root and the daemon's own uid are always allowed (they can reach the memory regardless).
public struct AccessList: Sendable, Equatable {
    public var everyone: Bool
    public var users: Set<UInt32>
    public var groups: Set<UInt32>

    public init(everyone: Bool = false, users: Set<UInt32> = [], groups: Set<UInt32> = []) {
        self.everyone = everyone
        self.users = users
        self.groups = groups
    }

    /// Whether a peer with these credentials is allowed.
    public func allows(_ peer: PeerCredentials, daemonUID: UInt32) -> Bool {
        if everyone || peer.uid == 0 || peer.uid == daemonUID || users.contains(peer.uid) { return true }
        if groups.contains(peer.gid) { return true }
        return peer.groups.contains { groups.contains($0) }
    }
}

/// One segment as the config describes it.
public struct SegmentDefinition: Sendable, Equatable {
    public var name: String
    /// Payload capacity in bytes.
    public var capacity: Int
    public var slots: Int
    public var readers: AccessList
    public var publishers: AccessList
    /// Whether the segment's memory is allocated when it is created (`"reserve"`, default true),
    /// so that a config that does not fit fails at start and a publish can never run the owner
    /// out of memory. `false` leaves it sparse: pages are allocated as versions are written.
    public var reservesMemory = true
    /// Whether the latest version is saved to disk and restored on start (`"persist"`, default
    /// false), so it survives `systemctl stop`/`start` and reboots, not only restarts.
    public var persists = false

    public var layout: SegmentLayout { SegmentLayout(capacity: capacity, slotCount: slots) }

    /// Describes a segment, as a config entry would (for a configuration built in code).
    ///
    /// - Parameters:
    ///   - name: 1–64 letters, digits, `.`, `_`, `-` (not `.` or `..`).
    ///   - capacity: bytes per version, 1 … 64 GiB.
    ///   - slots: 2 … 16 (default 3).
    ///   - readers: who may open and subscribe (root and the owner's uid always may).
    ///   - publishers: who may publish through the control socket.
    ///   - reservesMemory: allocate the memory when the segment is created (default true).
    public init(name: String, capacity: Int, slots: Int = BrokerConfiguration.defaultSlots, readers: AccessList = AccessList(everyone: true),
                publishers: AccessList = AccessList(), reservesMemory: Bool = true, persists: Bool = false) {
        self.persists = persists
        self.name = name
        self.capacity = capacity
        self.slots = slots
        self.readers = readers
        self.publishers = publishers
        self.reservesMemory = reservesMemory
    }
}

/// Where and how the control socket listens.
public struct SocketSettings: Sendable, Equatable {
    public var path: String
    public var mode: UInt32
    public var owner: UInt32?
    public var group: UInt32?

    /// - Parameters:
    ///   - path: an absolute path for the listening socket.
    ///   - mode: its permission bits (default 0666: access lists decide what each peer may do).
    ///   - owner: uid to give the socket file, if any.
    ///   - group: gid to give the socket file, if any.
    public init(path: String, mode: UInt32 = 0o666, owner: UInt32? = nil, group: UInt32? = nil) {
        self.path = path
        self.mode = mode
        self.owner = owner
        self.group = group
    }
}

/// Where and how often persistent segments are saved (`"persistence"`).
public struct PersistenceSettings: Sendable, Equatable {
    /// The directory of the saved files; default `${STATE_DIRECTORY:-/var/lib/shmbroker}` (systemd
    /// sets `STATE_DIRECTORY` from the unit's `StateDirectory=`).
    public var directory: String
    /// Seconds between saves of segments that changed (they are also saved on stop).
    public var intervalSeconds: Double

    public init(directory: String = "/var/lib/shmbroker", intervalSeconds: Double = 30) {
        self.directory = directory
        self.intervalSeconds = intervalSeconds
    }
}

/// How the daemon consumes publish rings (`"publishRings"`).
public struct PublishRingSettings: Sendable, Equatable {
    /// "A core for latency": after a ring delivered an entry, the daemon keeps polling its rings
    /// for this many microseconds instead of sleeping until a producer rings its doorbell, so a
    /// version that follows within the window is published without any wake-up (neither the
    /// producer's `write` to the doorbell nor the daemon's return from `epoll_wait`). The cost: the
    /// daemon's loop keeps one core busy for as long as producers publish at least this often,
    /// and for one window after the last entry. 0 (the default) sleeps at once.
    public var spinMicroseconds: Int
    /// The longest window accepted: a second.
    public static let maximumSpinMicroseconds = 1_000_000

    public init(spinMicroseconds: Int = 0) {
        self.spinMicroseconds = spinMicroseconds
    }
}

/// Where the metrics are also written for node_exporter's textfile collector (`"metrics"`).
public struct MetricsSettings: Sendable, Equatable {
    /// The `.prom` file, rewritten atomically every ``intervalSeconds``; nil: not written.
    public var textfile: String?
    public var intervalSeconds: Double
    /// The textfile's permission bits (`metrics.textfileMode`, default `0644`). A file every user
    /// may read holds only what every user may see (segments whose readers are `"*"`); a mode
    /// without the "others may read" bit holds every metric.
    public var textfileMode: UInt32

    public init(textfile: String? = nil, intervalSeconds: Double = 5, textfileMode: UInt32 = 0o644) {
        self.textfile = textfile
        self.intervalSeconds = intervalSeconds
        self.textfileMode = textfileMode
    }

    /// Whether every user may read the textfile, so that it may show only what everyone may see.
    public var textfileIsPublic: Bool { textfileMode & 0o004 != 0 }
}

/// Resource limits of the control channel.
public struct Limits: Sendable, Equatable {
    /// Most connections at once, from everyone (`limits.maxClients`).
    public var maximumClients = 1024
    /// Most connections at once from one uid other than root and the daemon's own
    /// (`limits.maxClientsPerUser`); nil means a quarter of ``maximumClients``, at least 1.
    public var configuredMaximumClientsPerUser: Int?
    /// Connections only root and the daemon's own uid may use (`limits.reservedClients`); nil
    /// means a sixteenth of ``maximumClients``, between 1 and 32 (0 when `maxClients` is 1).
    public var configuredReservedClients: Int?

    public init() {}

    /// The per-user limit in force.
    public var maximumClientsPerUser: Int { configuredMaximumClientsPerUser ?? max(1, maximumClients / 4) }
    /// The slots kept for root and the daemon's uid, never all of them.
    public var reservedClients: Int {
        min(configuredReservedClients ?? min(32, max(1, maximumClients / 16)), maximumClients - 1)
    }
    /// How long a subscriber's socket may stay full before it is disconnected.
    public var subscriberStallTimeoutSeconds = 10.0
}

/// A problem in a config file, located by its JSON path (such as `$.segments[2].size`).
public struct ConfigurationProblem: Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var message: String
    public var description: String { "\(path): \(message)" }

    public init(path: String, message: String) {
        self.path = path
        self.message = message
    }
}

/// Every problem found in a config file (the first ``maximumReported``, then a count of the rest).
public struct ConfigurationError: Error, Sendable, CustomStringConvertible {
    public var file: String
    public var problems: [ConfigurationProblem]

    public init(file: String, problems: [ConfigurationProblem]) {
        self.file = file
        self.problems = problems
    }

    /// Problems listed one by one; a file with more gets one closing line with the count.
    public static let maximumReported = 100

    static func capped(_ problems: [ConfigurationProblem]) -> [ConfigurationProblem] {
        guard problems.count > maximumReported else { return problems }
        return Array(problems.prefix(maximumReported))
            + [ConfigurationProblem(path: "$", message: "\(problems.count - maximumReported) more problems not listed")]
    }

    public var description: String {
        (["\(file): \(problems.count) problem\(problems.count == 1 ? "" : "s")"] + problems.map { "  \($0)" })
            .joined(separator: "\n")
    }
}

/// The daemon's configuration: control socket, limits and segments.
public struct BrokerConfiguration: Sendable, Equatable {
    /// Where the daemon looks when no `--config` is given.
    public static let defaultPath = "/etc/shmbroker/shmbroker.json"
    /// Slots per segment when the config does not say.
    public static let defaultSlots = 3
    /// Largest accepted segment capacity.
    public static let maximumCapacity = 64 << 30

    public var socket: SocketSettings
    public var limits: Limits
    public var segments: [SegmentDefinition]
    /// Where persistent segments are saved.
    public var persistence = PersistenceSettings()
    /// Whether and where the metrics are written to a file.
    public var metrics = MetricsSettings()
    /// How publish rings are consumed: whether the daemon spins on them.
    public var publishRings = PublishRingSettings()

    /// A configuration built in code. ``validated()`` checks it with the rules and messages of a
    /// config file; ``ShmBrokerOwner`` does so before it uses one.
    public init(socket: SocketSettings, limits: Limits = Limits(), segments: [SegmentDefinition]) {
        self.socket = socket
        self.limits = limits
        self.segments = segments
    }

    /// Reads and validates a config file.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigurationError) -> BrokerConfiguration {
        try check(ConfigurationChecker.parseFile(path), file: path, environment: environment)
    }

    /// Validates config text, collecting every problem rather than stopping at the first.
    public static func parse(_ text: [UInt8], file: String, environment: [String: String]) throws(ConfigurationError) -> BrokerConfiguration {
        try check(ConfigurationChecker.parse(text, file: file), file: file, environment: environment)
    }

    private static func check(_ root: JSONValue, file: String, environment: [String: String]) throws(ConfigurationError) -> BrokerConfiguration {
        var checker = ConfigurationChecker(environment: environment)
        let configuration = checker.configuration(root)
        if let configuration, checker.problems.isEmpty { return configuration }
        throw checker.error(file: file)
    }

    /// Parses sizes such as `4096`, `"512B"`, `"64KiB"`, `"16MiB"`, `"1GiB"`, `"10MB"`.
    public static func parseSize(_ text: String) -> Int? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let number = Int(digits) else { return nil }
        let unit = trimmed.dropFirst(digits.count).trimmingCharacters(in: .whitespaces)
        let multipliers: [String: Int] = [
            "": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
            "kB": 1_000, "KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000,
        ]
        guard let multiplier = multipliers[unit] else { return nil }
        let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : product
    }

    /// Whether `name` is a valid segment name: 1–64 of letters, digits, `.`, `_`, `-`.
    /// (Checked on every request, so it looks at bytes, not at Unicode character sets.)
    public static func isValidSegmentName(_ name: String) -> Bool {
        let bytes = name.utf8
        return !bytes.isEmpty && bytes.count <= SegmentLayout.maximumNameLength && bytes.allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
                return true
            default:
                return false
            }
        }
    }
}

/// The daemon configuration's own sections, checked with the generic walk of ``ConfigurationChecker``.
extension ConfigurationChecker {
    mutating func configuration(_ root: JSONValue) -> BrokerConfiguration? {
        guard let top = members(root, at: "$", allowed: ["$schema", "socket", "limits", "segments", "persistence", "metrics", "publishRings"],
                                required: ["socket", "segments"]) else {
            return nil
        }
        let socket = top["socket"].flatMap { socketSettings($0, at: "$.socket") }
        let limits = top["limits"].map { self.limits($0, at: "$.limits") } ?? Limits()
        let segments = top["segments"].flatMap { segmentList($0, at: "$.segments") } ?? []
        let persistence = persistenceSettings(top["persistence"], at: "$.persistence")
        guard let socket else { return nil }
        var configuration = BrokerConfiguration(socket: socket, limits: limits, segments: segments)
        configuration.persistence = persistence
        configuration.metrics = metricsSettings(top["metrics"], at: "$.metrics")
        configuration.publishRings = publishRingSettings(top["publishRings"], at: "$.publishRings")
        return configuration
    }

    mutating func publishRingSettings(_ value: JSONValue?, at path: String) -> PublishRingSettings {
        var settings = PublishRingSettings()
        guard let value, let fields = members(value, at: path, allowed: ["spinMicroseconds"]) else { return settings }
        if let spin = fields["spinMicroseconds"] {
            if case .number(let text) = spin, let microseconds = Int(text), (0...PublishRingSettings.maximumSpinMicroseconds).contains(microseconds) {
                settings.spinMicroseconds = microseconds
            } else {
                problem("\(path).spinMicroseconds", "expected a whole number of microseconds in [0, \(PublishRingSettings.maximumSpinMicroseconds)]")
            }
        }
        return settings
    }

    mutating func metricsSettings(_ value: JSONValue?, at path: String) -> MetricsSettings {
        var settings = MetricsSettings()
        guard let value, let fields = members(value, at: path, allowed: ["textfile", "intervalSeconds", "textfileMode"]) else { return settings }
        if let raw = fields["textfile"].flatMap({ string($0, at: "\(path).textfile") }), let expanded = expand(raw, at: "\(path).textfile") {
            if expanded.hasPrefix("/"), !expanded.utf8.contains(0), !expanded.hasSuffix("/") {
                settings.textfile = expanded
            } else {
                problem("\(path).textfile", "must be an absolute file path, got '\(expanded)'")
            }
        }
        if let raw = fields["textfileMode"].flatMap({ string($0, at: "\(path).textfileMode") }) {
            if let mode = UInt32(raw, radix: 8), mode <= 0o666 {
                settings.textfileMode = mode
            } else {
                problem("\(path).textfileMode", "expected an octal permission string such as \"0640\" (no execute or special bits), got \"\(raw)\"")
            }
        }
        if let interval = fields["intervalSeconds"] {
            if case .number(let text) = interval, let seconds = Double(text), seconds >= 1, seconds <= 3600 {
                settings.intervalSeconds = seconds
            } else {
                problem("\(path).intervalSeconds", "expected a number of seconds in [1, 3600]")
            }
        }
        return settings
    }

    mutating func persistenceSettings(_ value: JSONValue?, at path: String) -> PersistenceSettings {
        // systemd lists every StateDirectory= of the unit, separated by ':'; the first is ours.
        let stateDirectory = environment["STATE_DIRECTORY"]?.split(separator: ":").first.map(String.init)
        var settings = PersistenceSettings(directory: stateDirectory ?? "/var/lib/shmbroker")
        guard let value, let fields = members(value, at: path, allowed: ["directory", "intervalSeconds"]) else { return settings }
        if let raw = fields["directory"].flatMap({ string($0, at: "\(path).directory") }), let expanded = expand(raw, at: "\(path).directory") {
            if expanded.hasPrefix("/"), !expanded.utf8.contains(0) {
                settings.directory = expanded
            } else {
                problem("\(path).directory", "must be an absolute path, got '\(expanded)'")
            }
        }
        if let interval = fields["intervalSeconds"] {
            if case .number(let text) = interval, let seconds = Double(text), seconds >= 1, seconds <= 86_400 {
                settings.intervalSeconds = seconds
            } else {
                problem("\(path).intervalSeconds", "expected a number of seconds in [1, 86400]")
            }
        }
        return settings
    }

    /// A control socket's path, mode and owner, as in the daemon's `socket` section.
    public mutating func socketSettings(_ value: JSONValue, at path: String) -> SocketSettings? {
        guard let fields = members(value, at: path, allowed: ["path", "mode", "user", "group"], required: ["path"]) else { return nil }
        var settings = SocketSettings(path: "", mode: 0o660, owner: nil, group: nil)
        if let raw = fields["path"].flatMap({ string($0, at: "\(path).path") }) {
            if let expanded = expand(raw, at: "\(path).path") {
                if expanded.utf8.contains(0) {
                    problem("\(path).path", "contains a NUL character; a socket path cannot")
                } else if !expanded.hasPrefix("/") {
                    problem("\(path).path", "must be an absolute path, got '\(expanded)'")
                } else if expanded.utf8.count > SeqpacketSocket.maximumPathLength {
                    problem("\(path).path", "is \(expanded.utf8.count) bytes long; a Unix socket path holds at most \(SeqpacketSocket.maximumPathLength)")
                } else {
                    settings.path = expanded
                }
            }
        }
        if let raw = fields["mode"].flatMap({ string($0, at: "\(path).mode") }) {
            if let mode = UInt32(raw, radix: 8), mode <= 0o777 {
                settings.mode = mode
            } else {
                problem("\(path).mode", "expected an octal permission string such as \"0660\", got \"\(raw)\"")
            }
        }
        if let user = fields["user"] { settings.owner = identity(user, at: "\(path).user", kind: .user) }
        if let group = fields["group"] { settings.group = identity(group, at: "\(path).group", kind: .group) }
        return settings.path.isEmpty ? nil : settings
    }

    mutating func limits(_ value: JSONValue, at path: String) -> Limits {
        var limits = Limits()
        guard let fields = members(value, at: path, allowed: ["maxClients", "maxClientsPerUser", "reservedClients", "subscriberStallTimeoutSeconds"]) else { return limits }
        if let value = fields["maxClients"], let number = integer(value, at: "\(path).maxClients", in: 1...65_536) {
            limits.maximumClients = number
        }
        if let value = fields["maxClientsPerUser"], let number = integer(value, at: "\(path).maxClientsPerUser", in: 1...65_536) {
            limits.configuredMaximumClientsPerUser = number
        }
        if let value = fields["reservedClients"], let number = integer(value, at: "\(path).reservedClients", in: 0...65_535) {
            if number >= limits.maximumClients {
                problem("\(path).reservedClients", "must be smaller than maxClients (\(limits.maximumClients)), got \(number)")
            } else {
                limits.configuredReservedClients = number
            }
        }
        if let value = fields["subscriberStallTimeoutSeconds"] {
            if case .number(let text) = value, let seconds = Double(text), seconds > 0, seconds <= 3600 {
                limits.subscriberStallTimeoutSeconds = seconds
            } else {
                problem("\(path).subscriberStallTimeoutSeconds", "expected a number of seconds in (0, 3600]")
            }
        }
        return limits
    }

    mutating func segmentList(_ value: JSONValue, at path: String) -> [SegmentDefinition]? {
        guard case .array(let elements) = value else {
            problem(path, "expected an array, found \(value.typeName)")
            return nil
        }
        var seen: [String: Int] = [:]
        var result: [SegmentDefinition] = []
        for (index, element) in elements.enumerated() {
            let elementPath = "\(path)[\(index)]"
            guard let definition = segment(element, at: elementPath) else { continue }
            if let first = seen[definition.name] {
                problem("\(elementPath).name", "duplicate segment name \"\(definition.name)\" (first defined at \(path)[\(first)])")
                continue
            }
            seen[definition.name] = index
            result.append(definition)
        }
        return result
    }

    /// A segment definition as the daemon's config writes it; `extraKeys` are allowed beside
    /// its keys (the mirror's import entries add `from` and `segment`) and checked by the caller.
    public mutating func segment(_ value: JSONValue, at path: String, extraKeys: [String] = []) -> SegmentDefinition? {
        guard let fields = members(value, at: path, allowed: ["name", "size", "slots", "readers", "publishers", "description", "reserve", "persist"] + extraKeys,
                                   required: ["name", "size"]) else { return nil }
        let problemsBefore = problems.count
        var name = ""
        if let raw = fields["name"].flatMap({ string($0, at: "\(path).name") }) {
            if raw == "." || raw == ".." {
                problem("\(path).name", "\"\(raw)\" is not a valid name: '.' and '..' are reserved")
            } else if BrokerConfiguration.isValidSegmentName(raw) {
                name = raw
            } else {
                problem("\(path).name", "\"\(raw)\" is not a valid name: use 1 to 64 letters, digits, '.', '_' or '-'")
            }
        }
        var capacity = 0
        if let size = fields["size"] {
            capacity = self.size(size, at: "\(path).size") ?? 0
        }
        var slots = BrokerConfiguration.defaultSlots
        if let value = fields["slots"], let number = integer(value, at: "\(path).slots", in: SegmentLayout.slotCountRange) {
            slots = number
        }
        if let description = fields["description"] { _ = string(description, at: "\(path).description") }
        let readers = fields["readers"].map { accessList($0, at: "\(path).readers") } ?? AccessList()
        let publishers = fields["publishers"].map { accessList($0, at: "\(path).publishers") } ?? AccessList()
        var reserves = true
        if let value = fields["reserve"] {
            if case .bool(let flag) = value { reserves = flag } else { problem("\(path).reserve", "expected true or false, found \(value.typeName)") }
        }
        var persists = false
        if let value = fields["persist"] {
            if case .bool(let flag) = value { persists = flag } else { problem("\(path).persist", "expected true or false, found \(value.typeName)") }
        }
        guard problems.count == problemsBefore else { return nil }
        return SegmentDefinition(name: name, capacity: capacity, slots: slots, readers: readers, publishers: publishers,
                                 reservesMemory: reserves, persists: persists)
    }

    /// A size such as `4096` or `"16MiB"`, from 1 byte to 64 GiB.
    public mutating func size(_ value: JSONValue, at path: String) -> Int? {
        let parsed: Int?
        switch value {
        case .number(let text): parsed = Int(text)
        case .string(let text): parsed = BrokerConfiguration.parseSize(text)
        default: parsed = nil
        }
        if parsed == nil, case .number(let text) = value {
            problem(path, Self.whyNotAnInteger(text) + "; sizes are byte counts such as 4096, or strings such as \"64KiB\"")
            return nil
        }
        guard let bytes = parsed else {
            problem(path, "expected a byte count such as 4096 or a string such as \"64KiB\", \"16MiB\", \"1GiB\"; found \(value.typeName)\(describe(value))")
            return nil
        }
        guard bytes >= 1, bytes <= BrokerConfiguration.maximumCapacity else {
            problem(path, "size \(bytes) bytes is out of range 1 byte ... 64 GiB")
            return nil
        }
        return bytes
    }

    func describe(_ value: JSONValue) -> String {
        switch value {
        case .string(let text): return " \"\(text)\""
        case .number(let text): return " \(text)"
        default: return ""
        }
    }

    mutating func accessList(_ value: JSONValue, at path: String) -> AccessList {
        var list = AccessList()
        guard let fields = members(value, at: path, allowed: ["users", "groups"]) else { return list }
        for (key, kind) in [("users", IdentityKind.user), ("groups", IdentityKind.group)] {
            guard let entries = fields[key] else { continue }
            guard case .array(let items) = entries else {
                problem("\(path).\(key)", "expected an array of names or numeric ids, found \(entries.typeName)")
                continue
            }
            for (index, item) in items.enumerated() {
                if kind == .user, case .string("*") = item {
                    list.everyone = true
                    continue
                }
                guard let id = identity(item, at: "\(path).\(key)[\(index)]", kind: kind) else { continue }
                if kind == .user { list.users.insert(id) } else { list.groups.insert(id) }
            }
        }
        return list
    }

    enum IdentityKind { case user, group }

    mutating func identity(_ value: JSONValue, at path: String, kind: IdentityKind) -> UInt32? {
        switch value {
        case .number(let text):
            guard let id = UInt32(text) else {
                problem(path, "\(text) is not a valid numeric \(kind == .user ? "uid" : "gid")")
                return nil
            }
            return id
        case .string(let name):
            if let id = UInt32(name) { return id }
            if let id = (kind == .user ? SystemAccounts.uid(ofUser: name) : SystemAccounts.gid(ofGroup: name)) { return id }
            problem(path, "unknown \(kind == .user ? "user" : "group") \"\(name)\"")
            return nil
        default:
            problem(path, "expected a \(kind == .user ? "user" : "group") name or numeric id, found \(value.typeName)")
            return nil
        }
    }

}

/// User and group database look-ups (NSS), for names in the config.
public enum SystemAccounts {
    public static func uid(ofUser name: String) -> UInt32? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16_384)
        guard getpwnam_r(name, &entry, &buffer, buffer.count, &result) == 0, result != nil else { return nil }
        return entry.pw_uid
    }

    public static func gid(ofGroup name: String) -> UInt32? {
        var entry = group()
        var result: UnsafeMutablePointer<group>?
        var buffer = [CChar](repeating: 0, count: 65_536)
        guard getgrnam_r(name, &entry, &buffer, buffer.count, &result) == 0, result != nil else { return nil }
        return entry.gr_gid
    }
}
