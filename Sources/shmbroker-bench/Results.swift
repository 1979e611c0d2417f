import Foundation

/// `results.json`: what a run measured, family by family (a family left out by `--only` is
/// absent), and the goal verdicts. The keys are the file's format, read by `plot.py` and by
/// whoever compares runs; they do not change when the Swift names do.
struct BenchmarkResults: Encodable {
    var machine: String
    var quick: Bool
    var crcHardwareAccelerated: Bool
    var crcPath: String
    var crcPathsSupported: [String]
    var crc64: [String: CRCRow]?
    var verifiedRead: [String: VerifiedReadRow]?
    var latency: [String: LatencyRow]?
    var throughput: [String: ThroughputRow]?
    var onePass: [String: OnePassRow]?
    var fanOut: [String: FanOutRow]?
    var publishRate: PublishRateResult?
    var scale: ScaleResult?
    var goals: [GoalResult] = []

    /// The file's bytes: pretty-printed, keys sorted.
    func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }
}

/// A measured number; one that could not be measured (a baseline library absent, a transport
/// left out) is NaN in Swift and `null` in the file.
struct Measured: Encodable, Equatable {
    var value: Double

    init(_ value: Double) { self.value = value }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if value.isFinite { try container.encode(value) } else { try container.encodeNil() }
    }
}

/// Large versions with integrity in one pass against the no-integrity floor (MB/s).
struct OnePassRow: Encodable {
    var floor: Measured
    var onePass: Measured
    var twoPass: Measured
    var ratioOnePass: Measured
    var ratioTwoPass: Measured
    var ratioOnePassPerTrial: [Measured]
    var cpuCores: [String: CPUShares]
}

/// One goal's verdict.
struct GoalResult: Encodable {
    var goal: String
    var value: Measured
    var target: Double
    var met: Bool
}

extension LatencySummary: Encodable {
    enum CodingKeys: String, CodingKey {
        case count, p50 = "p50_us", p99 = "p99_us", p999 = "p999_us"
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(count, forKey: .count)
        try container.encode(Measured(p50), forKey: .p50)
        try container.encode(Measured(p99), forKey: .p99)
        try container.encode(Measured(p999), forKey: .p999)
    }
}

/// CRC-64 throughput at one size, GB/s, per implementation.
struct CRCRow: Encodable {
    var paths: [String: Measured]
    var active: String
    var shmbroker, portable, liblzma, isal: Measured
    var overLiblzma, overIsal, overIsalPaired: Measured

    enum CodingKeys: String, CodingKey {
        case paths = "paths_GBps", active, shmbroker = "shmbroker_GBps", portable = "portable_GBps",
             liblzma = "liblzma_GBps", isal = "isal_GBps", overLiblzma = "ratio", overIsal = "ratio_isal",
             overIsalPaired = "ratio_isal_paired"
    }
}

/// A verified read against memcpy at one size, GB/s.
struct VerifiedReadRow: Encodable {
    var verified, memcpy, ratio: Measured

    enum CodingKeys: String, CodingKey {
        case verified = "verified_GBps", memcpy = "memcpy_GBps", ratio
    }
}

/// End-to-end latency at one payload size: the sockets, and each path of ours by name
/// (`requests`, `ring`, `owner-futex`, `owner-spin`, `owner-events`).
struct LatencyRow: Encodable {
    var socket: LatencySummary
    var socketRelay: LatencySummary
    var paths: [String: LatencyPath] = [:]
    var ringOverRelay: Measured?

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: NamedKey.self)
        try container.encode(socket, forKey: "socket")
        try container.encode(socketRelay, forKey: "socket_relay")
        try container.encodeIfPresent(ringOverRelay, forKey: "ring_over_relay")
        for (name, path) in paths { try container.encode(path, forKey: NamedKey(stringValue: name)) }
    }
}

/// A key named at run time (a path, a segment count), for the rows whose keys are data.
struct NamedKey: CodingKey, ExpressibleByStringLiteral {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init(stringLiteral value: String) { self.stringValue = value }
    init?(intValue: Int) { nil }
}

/// One path's latency, its ratio to the socket's p50 and where its time went (medians, µs).
struct LatencyPath: Encodable {
    var shm: LatencySummary
    var p50Ratio: Measured
    var producerToDaemon, daemonToReader: Measured?
    var publishCall, afterCall: Measured?
    /// CPU the daemon used during the run, in cores (a spinning daemon's cost).
    var daemonCores: Measured?

    enum CodingKeys: String, CodingKey {
        case shm, p50Ratio = "p50_ratio", producerToDaemon = "median_producer_to_daemon_us",
             daemonToReader = "median_daemon_to_reader_us", publishCall = "median_publish_call_us",
             afterCall = "median_after_call_us", daemonCores = "daemon_cpu_cores"
    }
}

/// Throughput of one case (size × readers), MB/s to all readers, and the ratios to the socket.
struct ThroughputRow: Encodable {
    var ringCopy, ringZeroCopy, requestsZeroCopy, socket: Measured
    var ratio, ratioZeroCopy, ratioRequestsZeroCopy: Measured
    var published: Int
    var owner, ratioOwner, ownerSpin, ratioOwnerSpin: Measured
    var ratioOwnerPerTrial, ratioRingOverRequestsPerTrial: [Measured]
    /// CPU cores used in each transport's median trial (daemon, producer, readers).
    var cpuCores: [String: CPUShares]

    enum CodingKeys: String, CodingKey {
        case ringCopy = "shm_MBps", ringZeroCopy = "shm_zero_copy_MBps", requestsZeroCopy = "shm_requests_zero_copy_MBps",
             socket = "socket_MBps", ratio, ratioZeroCopy = "ratio_zero_copy", ratioRequestsZeroCopy = "ratio_requests_zero_copy",
             published, owner = "owner_zero_copy_MBps", ratioOwner = "ratio_owner_zero_copy",
             ownerSpin = "owner_spin_zero_copy_MBps", ratioOwnerSpin = "ratio_owner_spin_zero_copy",
             ratioOwnerPerTrial = "ratio_owner_per_trial", ratioRingOverRequestsPerTrial = "ratio_ring_over_requests_per_trial",
             cpuCores = "cpu_cores_median_trial"
    }
}

/// Fan-out to N readers: the last reader's latency through a ring, from the owner, and by socket.
struct FanOutRow: Encodable {
    var shm, owner, socket: LatencySummary
    /// The floor: a bare futex wake-all of as many processes.
    var futexFloor: LatencySummary
    var p50Ratio, ownerP50Ratio: Measured
    var ownerOverFloor: Measured

    enum CodingKeys: String, CodingKey {
        case shm, owner, socket, futexFloor = "futex_floor", p50Ratio = "p50_ratio", ownerP50Ratio = "owner_p50_ratio",
             ownerOverFloor = "owner_over_futex_floor_p50"
    }
}

/// Publishes per second of 64 B by each path.
struct PublishRateResult: Encodable {
    var sequential, pipelined: Measured
    var window: Int
    var ring, ownerZeroCopy, ownerCopy: Measured

    enum CodingKeys: String, CodingKey {
        case sequential = "sequential_per_s", pipelined = "pipelined_per_s", window, ring = "ring_per_s",
             ownerZeroCopy = "owner_zero_copy_per_s", ownerCopy = "owner_copy_per_s"
    }
}

/// Start-up time by segment count, and the daemon's memory and rate with 1000 idle clients.
struct ScaleResult: Encodable {
    /// Milliseconds from start to READY=1, by segment count.
    var readyMilliseconds: [Int: Measured] = [:]
    var idleClients: Int?
    var rssBeyondSegmentsMiB, segmentMemoryMiB: Measured?
    var rateWithoutIdleClients, rateWithIdleClients: Measured?

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: NamedKey.self)
        try container.encodeIfPresent(idleClients, forKey: "idleClients")
        try container.encodeIfPresent(rssBeyondSegmentsMiB, forKey: "rssBeyondSegments_MiB")
        try container.encodeIfPresent(segmentMemoryMiB, forKey: "segmentMemory_MiB")
        try container.encodeIfPresent(rateWithoutIdleClients, forKey: "publishRate_noIdleClients")
        try container.encodeIfPresent(rateWithIdleClients, forKey: "publishRate_1000IdleClients")
        for (count, milliseconds) in readyMilliseconds {
            try container.encode(milliseconds, forKey: NamedKey(stringValue: "readyMs_\(count)"))
        }
    }
}
