import Foundation

/// The daemon's answer to STATUS, carried as JSON (its schema is in `docs/PROTOCOL.md`).
public struct StatusReport: Codable, Sendable, Equatable {
    public struct Daemon: Codable, Sendable, Equatable {
        /// The owner process's name: `shmbrokerd`, or the application embedding the owner.
        public var name: String
        /// shmbroker's release version (``ShmBrokerVersion``).
        public var version: String
        public var pid: Int32
        public var startedAt: Double
        public var configPath: String
        public var socketPath: String
        public var protocolVersion: UInt32

        public init(name: String = "shmbrokerd", version: String, pid: Int32, startedAt: Double, configPath: String, socketPath: String,
                    protocolVersion: UInt32) {
            self.name = name
            self.version = version
            self.pid = pid
            self.startedAt = startedAt
            self.configPath = configPath
            self.socketPath = socketPath
            self.protocolVersion = protocolVersion
        }

        private enum CodingKeys: String, CodingKey { case name, version, pid, startedAt, configPath, socketPath, protocolVersion }

        /// Decodes the daemon section; an owner older than `name` reads as `shmbrokerd`.
        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            name = try container.decodeIfPresent(String.self, forKey: .name) ?? "shmbrokerd"
            version = try container.decode(String.self, forKey: .version)
            pid = try container.decode(Int32.self, forKey: .pid)
            startedAt = try container.decode(Double.self, forKey: .startedAt)
            configPath = try container.decode(String.self, forKey: .configPath)
            socketPath = try container.decode(String.self, forKey: .socketPath)
            protocolVersion = try container.decode(UInt32.self, forKey: .protocolVersion)
        }
    }

    public struct Segment: Codable, Sendable, Equatable {
        public var name: String
        public var capacity: UInt64
        public var slots: UInt32
        public var mappingSize: UInt64
        /// Latest version (0: never published).
        public var version: UInt64
        public var length: UInt64
        /// CRC-64/XZ of the latest version, as 16 lowercase hex digits.
        public var crc64: String
        /// Unix time of the latest publish in seconds, nil if never published.
        public var lastPublishedAt: Double?
        /// Connected clients that have opened the segment.
        public var readers: Int
        public var subscribers: Int
        /// Where a mirrored segment's versions come from and how far behind it is; nil for a
        /// segment published on this host.
        public var mirror: Mirror?

        public init(name: String, capacity: UInt64, slots: UInt32, mappingSize: UInt64, version: UInt64, length: UInt64,
                    crc64: String, lastPublishedAt: Double?, readers: Int, subscribers: Int, mirror: Mirror? = nil) {
            self.mirror = mirror
            self.name = name
            self.capacity = capacity
            self.slots = slots
            self.mappingSize = mappingSize
            self.version = version
            self.length = length
            self.crc64 = crc64
            self.lastPublishedAt = lastPublishedAt
            self.readers = readers
            self.subscribers = subscribers
        }
    }

    /// A mirrored segment's source and freshness (`docs/MIRROR.md`).
    public struct Mirror: Codable, Sendable, Equatable {
        /// The host and segment the versions come from.
        public var sourceHost: String
        public var sourceSegment: String
        /// The source segment's epoch (its creation time): a new epoch started the local segment over.
        public var sourceEpoch: UInt64
        /// The highest version the source announced (in a heartbeat or a value).
        public var sourceVersion: UInt64
        /// The source versions this host has not served yet (`sourceVersion` − local version, or 0).
        public var lagVersions: UInt64
        /// How long the local segment has been behind the source, in seconds (0 when caught up).
        public var lagSeconds: Double
        /// Whether the segment is stale: no heartbeat from the source, or behind it, for longer
        /// than its bound. The last good version stays readable.
        public var stale: Bool
        /// Unix time (seconds) since when it is stale; nil when fresh.
        public var staleSince: Double?
        /// Unix time (seconds) of the last heartbeat heard from the source; nil if none yet.
        public var lastHeartbeatAt: Double?

        public init(sourceHost: String, sourceSegment: String, sourceEpoch: UInt64, sourceVersion: UInt64, lagVersions: UInt64,
                    lagSeconds: Double, stale: Bool, staleSince: Double?, lastHeartbeatAt: Double?) {
            self.sourceHost = sourceHost
            self.sourceSegment = sourceSegment
            self.sourceEpoch = sourceEpoch
            self.sourceVersion = sourceVersion
            self.lagVersions = lagVersions
            self.lagSeconds = lagSeconds
            self.stale = stale
            self.staleSince = staleSince
            self.lastHeartbeatAt = lastHeartbeatAt
        }
    }

    public struct Client: Codable, Sendable, Equatable {
        public var id: UInt64
        public var name: String
        public var pid: Int32
        public var uid: UInt32
        public var gid: UInt32
        public var opened: [String]
        public var subscriptions: [String]
        /// Segments this client has a publish ring attached to.
        public var rings: [String]

        public init(id: UInt64, name: String, pid: Int32, uid: UInt32, gid: UInt32, opened: [String], subscriptions: [String],
                    rings: [String] = []) {
            self.id = id
            self.name = name
            self.pid = pid
            self.uid = uid
            self.gid = gid
            self.opened = opened
            self.subscriptions = subscriptions
            self.rings = rings
        }

        private enum CodingKeys: String, CodingKey {
            case id, name, pid, uid, gid, opened, subscriptions, rings
        }

        /// Decodes a client entry; `rings` may be absent (daemons before publish rings).
        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            id = try container.decode(UInt64.self, forKey: .id)
            name = try container.decode(String.self, forKey: .name)
            pid = try container.decode(Int32.self, forKey: .pid)
            uid = try container.decode(UInt32.self, forKey: .uid)
            gid = try container.decode(UInt32.self, forKey: .gid)
            opened = try container.decode([String].self, forKey: .opened)
            subscriptions = try container.decode([String].self, forKey: .subscriptions)
            rings = try container.decodeIfPresent([String].self, forKey: .rings) ?? []
        }
    }

    public struct Counters: Codable, Sendable, Equatable {
        public var clientsAccepted: UInt64 = 0
        public var clientsRefused: UInt64 = 0
        public var publishes: UInt64 = 0
        public var eventsSent: UInt64 = 0
        public var eventsCoalesced: UInt64 = 0
        public var slowSubscribersDisconnected: UInt64 = 0
        public var malformedRequests: UInt64 = 0
        public var errorReplies: UInt64 = 0
        public var reloads: UInt64 = 0
        public var failedReloads: UInt64 = 0
        /// Requests whose descriptors the kernel dropped because the daemon was at its
        /// descriptor limit (answered `descriptor-limit`).
        public var descriptorLimitRefusals: UInt64 = 0

        public init() {}

        private enum CodingKeys: String, CodingKey {
            case clientsAccepted, clientsRefused, publishes, eventsSent, eventsCoalesced, slowSubscribersDisconnected
            case malformedRequests, errorReplies, reloads, failedReloads, descriptorLimitRefusals
        }

        /// Decodes counters; a counter an older daemon does not report reads as 0.
        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            func value(_ key: CodingKeys) throws -> UInt64 { try container.decodeIfPresent(UInt64.self, forKey: key) ?? 0 }
            clientsAccepted = try value(.clientsAccepted)
            clientsRefused = try value(.clientsRefused)
            publishes = try value(.publishes)
            eventsSent = try value(.eventsSent)
            eventsCoalesced = try value(.eventsCoalesced)
            slowSubscribersDisconnected = try value(.slowSubscribersDisconnected)
            malformedRequests = try value(.malformedRequests)
            errorReplies = try value(.errorReplies)
            reloads = try value(.reloads)
            failedReloads = try value(.failedReloads)
            descriptorLimitRefusals = try value(.descriptorLimitRefusals)
        }
    }

    public var daemon: Daemon
    public var segments: [Segment]
    public var clients: [Client]
    public var counters: Counters

    public init(daemon: Daemon, segments: [Segment], clients: [Client], counters: Counters) {
        self.daemon = daemon
        self.segments = segments
        self.clients = clients
        self.counters = counters
    }

    /// Pretty, key-sorted JSON.
    public func encoded() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return Array(try encoder.encode(self))
    }

    public static func decode(_ json: [UInt8]) throws -> StatusReport {
        try JSONDecoder().decode(StatusReport.self, from: Data(json))
    }
}
