import Foundation
import ShmBrokerConfig
import ShmBrokerPlatform

/// How to reach the NATS cluster.
public struct NatsSettings: Sendable, Equatable {
    public enum Credentials: Sendable, Equatable {
        case none
        /// A `.creds` file (JWT and nkey seed), as `nsc` writes it.
        case credsFile(String)
        /// An nkey: its public key and the file holding its seed.
        case nkey(publicKey: String, seedFile: String)
        /// A user and the password read from a file (never written in the config itself).
        case user(String, password: String)
    }

    public struct TLS: Sendable, Equatable {
        public var caFile: String?
        public var certificateFile: String?
        public var keyFile: String?
    }

    public var servers: [String]
    public var bucket = "shmbroker"
    public var credentials = Credentials.none
    public var tls: TLS?
    /// Set: create the bucket with these settings if it does not exist.
    public var createBucket: BucketCreation?
    /// How long a put, a get or a connection attempt may take.
    public var requestTimeoutSeconds = 2.0
}

/// The bucket's settings when the mirror creates it.
public struct BucketCreation: Sendable, Equatable {
    public var replicas = 3
    public var memoryStorage = false
    /// The largest value the bucket accepts (the chunk size plus the header fits).
    public var maximumValueSize = 1 << 20
}

/// An exported segment: read from the local owner and put to the bucket.
public struct ExportSettings: Sendable, Equatable {
    /// The local owner's control socket (shmbrokerd's, or an embedding application's).
    public var socket: String
    public var segments: [String]
}

/// An imported segment: watched in the bucket and served here under `definition`.
public struct ImportedSegment: Sendable, Equatable {
    public var sourceHost: String
    public var sourceSegment: String
    /// The local segment: name, capacity, slots and this host's own readers list. Nobody but
    /// the mirror may publish to it.
    public var definition: SegmentDefinition
    public var staleAfterSeconds: Double
}

/// `shmbroker-mirror`'s configuration (`docs/MIRROR.md`, schema in
/// `config/shmbroker-mirror.schema.json`).
public struct MirrorConfiguration: Sendable, Equatable {
    public static let defaultPath = "/etc/shmbroker/mirror.json"
    /// Chunks stay under NATS's default 1 MiB payload with the value header and NATS's own.
    public static let defaultChunkSize = (1 << 20) - 4096

    /// This host's name in the bucket's keys: letters, digits, `_` and `-`.
    public var host: String
    public var nats: NatsSettings
    public var chunkSize = defaultChunkSize
    public var heartbeatIntervalSeconds = 0.25
    public var staleAfterSeconds = 1.0
    public var clockToleranceSeconds = 0.25
    public var export: ExportSettings?
    /// The control socket readers of imported segments connect to.
    public var importSocket: SocketSettings?
    public var imports: [ImportedSegment] = []

    /// Reads and checks a config file, reporting every problem with its JSON path.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigurationError) -> MirrorConfiguration {
        let root = try ConfigurationChecker.parseFile(path)
        var checker = ConfigurationChecker(environment: environment)
        let configuration = checker.mirrorConfiguration(root)
        if let configuration, checker.problems.isEmpty { return configuration }
        throw checker.error(file: path)
    }

    /// Whether `name` may be a host name in keys and subjects.
    public static func isValidHostName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 64 && name.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }
}

extension ConfigurationChecker {
    mutating func mirrorConfiguration(_ root: JSONValue) -> MirrorConfiguration? {
        guard let top = members(root, at: "$", allowed: ["$schema", "host", "nats", "chunkSize", "heartbeatIntervalSeconds", "staleAfterSeconds",
                                                         "clockToleranceSeconds", "export", "import"],
                                required: ["host", "nats"]) else { return nil }
        var host = ""
        if let raw = top["host"].flatMap({ expandedString($0, at: "$.host") }) {
            if MirrorConfiguration.isValidHostName(raw) { host = raw } else {
                problem("$.host", "\"\(raw)\" is not a valid host name: use 1 to 64 letters, digits, '_' or '-'")
            }
        }
        let nats = top["nats"].flatMap { natsSettings($0, at: "$.nats") }
        var configuration = MirrorConfiguration(host: host, nats: nats ?? NatsSettings(servers: []))
        if let value = top["chunkSize"], let size = size(value, at: "$.chunkSize") {
            if (4096...(64 << 20)).contains(size) { configuration.chunkSize = size } else {
                problem("$.chunkSize", "\(size) bytes is out of range 4 KiB ... 64 MiB (and must fit the servers' max_payload with 64 bytes of header)")
            }
        }
        if let value = top["heartbeatIntervalSeconds"], let seconds = seconds(value, at: "$.heartbeatIntervalSeconds", in: 0.01...60) {
            configuration.heartbeatIntervalSeconds = seconds
        }
        if let value = top["staleAfterSeconds"], let seconds = seconds(value, at: "$.staleAfterSeconds", in: 0.05...3600) {
            configuration.staleAfterSeconds = seconds
        }
        if let value = top["clockToleranceSeconds"], let seconds = seconds(value, at: "$.clockToleranceSeconds", in: 0...3600) {
            configuration.clockToleranceSeconds = seconds
        }
        if configuration.heartbeatIntervalSeconds >= configuration.staleAfterSeconds {
            problem("$.heartbeatIntervalSeconds", "must be shorter than staleAfterSeconds (\(configuration.staleAfterSeconds)), or every segment would turn stale between heartbeats")
        }
        if let value = top["export"] { configuration.export = exportSettings(value, at: "$.export") }
        if let value = top["import"] { importSettings(value, at: "$.import", into: &configuration) }
        if configuration.export == nil && configuration.imports.isEmpty {
            problem("$", "nothing to do: give an \"export\" section, an \"import\" section, or both")
        }
        return nats == nil || host.isEmpty ? nil : configuration
    }

    mutating func natsSettings(_ value: JSONValue, at path: String) -> NatsSettings? {
        guard let fields = members(value, at: path, allowed: ["servers", "bucket", "credentials", "tls", "createBucket", "requestTimeoutSeconds"],
                                   required: ["servers"]) else { return nil }
        var settings = NatsSettings(servers: [])
        if case .array(let items)? = fields["servers"] {
            for (index, item) in items.enumerated() {
                guard let url = expandedString(item, at: "\(path).servers[\(index)]") else { continue }
                if url.hasPrefix("nats://") || url.hasPrefix("tls://") { settings.servers.append(url) } else {
                    problem("\(path).servers[\(index)]", "\"\(url)\" is not a NATS URL (nats://host:port or tls://host:port)")
                }
            }
            if items.isEmpty { problem("\(path).servers", "name at least one server") }
        } else if let servers = fields["servers"] {
            problem("\(path).servers", "expected an array of URLs, found \(servers.typeName)")
        }
        if let raw = fields["bucket"].flatMap({ expandedString($0, at: "\(path).bucket") }) {
            if MirrorConfiguration.isValidHostName(raw) { settings.bucket = raw } else {
                problem("\(path).bucket", "\"\(raw)\" is not a valid bucket name: letters, digits, '_' or '-'")
            }
        }
        if let value = fields["credentials"] { settings.credentials = credentials(value, at: "\(path).credentials") }
        if let value = fields["tls"], let tls = members(value, at: "\(path).tls", allowed: ["caFile", "certificateFile", "keyFile"]) {
            var settingsTLS = NatsSettings.TLS()
            settingsTLS.caFile = tls["caFile"].flatMap { readableFile($0, at: "\(path).tls.caFile", secret: false) }
            settingsTLS.certificateFile = tls["certificateFile"].flatMap { readableFile($0, at: "\(path).tls.certificateFile", secret: false) }
            settingsTLS.keyFile = tls["keyFile"].flatMap { readableFile($0, at: "\(path).tls.keyFile", secret: true) }
            if (settingsTLS.certificateFile == nil) != (settingsTLS.keyFile == nil), tls["certificateFile"] != nil || tls["keyFile"] != nil {
                problem("\(path).tls", "give both certificateFile and keyFile for a client certificate")
            }
            settings.tls = settingsTLS
        }
        if let value = fields["createBucket"],
           let create = members(value, at: "\(path).createBucket", allowed: ["replicas", "storage", "maxValueSize"]) {
            var creation = BucketCreation()
            if let replicas = create["replicas"].flatMap({ integer($0, at: "\(path).createBucket.replicas", in: 1...5) }) { creation.replicas = replicas }
            if let storage = create["storage"].flatMap({ string($0, at: "\(path).createBucket.storage") }) {
                if storage == "memory" || storage == "file" { creation.memoryStorage = storage == "memory" } else {
                    problem("\(path).createBucket.storage", "expected \"file\" or \"memory\", got \"\(storage)\"")
                }
            }
            if let size = create["maxValueSize"].flatMap({ self.size($0, at: "\(path).createBucket.maxValueSize") }) { creation.maximumValueSize = size }
            settings.createBucket = creation
        }
        if let value = fields["requestTimeoutSeconds"], let seconds = seconds(value, at: "\(path).requestTimeoutSeconds", in: 0.05...120) {
            settings.requestTimeoutSeconds = seconds
        }
        return settings
    }

    mutating func credentials(_ value: JSONValue, at path: String) -> NatsSettings.Credentials {
        guard let fields = members(value, at: path, allowed: ["credsFile", "nkey", "seedFile", "user", "passwordFile"]) else { return .none }
        if let file = fields["credsFile"] {
            return readableFile(file, at: "\(path).credsFile", secret: true).map { .credsFile($0) } ?? .none
        }
        if let key = fields["nkey"].flatMap({ expandedString($0, at: "\(path).nkey") }) {
            guard let seed = fields["seedFile"] else {
                problem("\(path).seedFile", "an nkey needs its seedFile")
                return .none
            }
            return readableFile(seed, at: "\(path).seedFile", secret: true).map { .nkey(publicKey: key, seedFile: $0) } ?? .none
        }
        if let user = fields["user"].flatMap({ expandedString($0, at: "\(path).user") }) {
            guard let file = fields["passwordFile"], let path2 = readableFile(file, at: "\(path).passwordFile", secret: true) else {
                if fields["passwordFile"] == nil { problem("\(path).passwordFile", "a user needs a passwordFile (passwords are not written in the config)") }
                return .none
            }
            guard let password = FileManager.default.contents(atPath: path2).flatMap({ String(data: $0, encoding: .utf8) }) else {
                problem("\(path).passwordFile", "cannot be read")
                return .none
            }
            return .user(user, password: password.trimmingCharacters(in: .newlines))
        }
        problem(path, "give credsFile, nkey with seedFile, or user with passwordFile")
        return .none
    }

    /// An absolute path to a regular file this process can read; a `secret` one (a key, a
    /// seed, a password) must not be readable or writable by group or others, and must belong
    /// to this user or root.
    mutating func readableFile(_ value: JSONValue, at path: String, secret: Bool) -> String? {
        guard let file = expandedString(value, at: path) else { return nil }
        guard file.hasPrefix("/") else {
            problem(path, "must be an absolute path, got '\(file)'")
            return nil
        }
        guard let entry = try? FileSystem.entry(at: file), entry.isRegularFile else {
            problem(path, "\(file) does not exist or is not a regular file")
            return nil
        }
        if secret {
            if entry.mode & 0o077 != 0 {
                problem(path, "\(file) is accessible by other users (mode \(String(entry.mode & 0o777, radix: 8))); make it 0600 or 0400")
                return nil
            }
            let uid = CurrentProcess.userID
            if entry.uid != uid && entry.uid != 0 {
                problem(path, "\(file) belongs to uid \(entry.uid), not to this user (\(uid)) or root")
                return nil
            }
        }
        return file
    }

    mutating func exportSettings(_ value: JSONValue, at path: String) -> ExportSettings? {
        guard let fields = members(value, at: path, allowed: ["socket", "segments"], required: ["segments"]) else { return nil }
        var settings = ExportSettings(socket: "/run/shmbroker/control.sock", segments: [])
        if let socket = fields["socket"].flatMap({ expandedString($0, at: "\(path).socket") }) {
            if socket.hasPrefix("/") { settings.socket = socket } else { problem("\(path).socket", "must be an absolute path, got '\(socket)'") }
        }
        if case .array(let items)? = fields["segments"] {
            for (index, item) in items.enumerated() {
                guard let name = string(item, at: "\(path).segments[\(index)]") else { continue }
                if !BrokerConfiguration.isValidSegmentName(name) {
                    problem("\(path).segments[\(index)]", "\"\(name)\" is not a valid segment name")
                } else if settings.segments.contains(name) {
                    problem("\(path).segments[\(index)]", "\"\(name)\" is listed twice")
                } else {
                    settings.segments.append(name)
                }
            }
        } else if let segments = fields["segments"] {
            problem("\(path).segments", "expected an array of segment names, found \(segments.typeName)")
        }
        return settings
    }

    mutating func importSettings(_ value: JSONValue, at path: String, into configuration: inout MirrorConfiguration) {
        guard let fields = members(value, at: path, allowed: ["socket", "segments"], required: ["socket", "segments"]) else { return }
        configuration.importSocket = fields["socket"].flatMap { socketSettings($0, at: "\(path).socket") }
        guard case .array(let items)? = fields["segments"] else {
            if let segments = fields["segments"] { problem("\(path).segments", "expected an array, found \(segments.typeName)") }
            return
        }
        for (index, item) in items.enumerated() {
            let at = "\(path).segments[\(index)]"
            guard case .object(let pairs) = item else {
                problem(at, "expected an object, found \(item.typeName)")
                continue
            }
            guard let definition = segment(item, at: at, extraKeys: ["from", "segment", "staleAfterSeconds"]) else { continue }
            let object = Dictionary(pairs, uniquingKeysWith: { first, _ in first })
            if object["publishers"] != nil {
                problem("\(at).publishers", "an imported segment is published by the mirror alone; remove \"publishers\"")
            }
            guard let from = object["from"].flatMap({ expandedString($0, at: "\(at).from") }) else {
                problem("\(at).from", "required key is missing (the source host)")
                continue
            }
            guard MirrorConfiguration.isValidHostName(from) else {
                problem("\(at).from", "\"\(from)\" is not a valid host name")
                continue
            }
            let source = object["segment"].flatMap { string($0, at: "\(at).segment") } ?? definition.name
            guard BrokerConfiguration.isValidSegmentName(source) else {
                problem("\(at).segment", "\"\(source)\" is not a valid segment name")
                continue
            }
            let staleAfter = object["staleAfterSeconds"].flatMap { seconds($0, at: "\(at).staleAfterSeconds", in: 0.05...3600) }
            if configuration.imports.contains(where: { $0.definition.name == definition.name }) {
                problem("\(at).name", "\"\(definition.name)\" is imported twice")
                continue
            }
            configuration.imports.append(ImportedSegment(sourceHost: from, sourceSegment: source, definition: definition,
                                                         staleAfterSeconds: staleAfter ?? configuration.staleAfterSeconds))
        }
    }
}
