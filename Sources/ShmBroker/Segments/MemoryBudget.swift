import Foundation
import ShmBrokerConfig
import SystemPackage

/// How much memory the owner may still allocate, so that segments that do not fit are refused
/// before anything is allocated (allocating first would invite the OOM killer instead).
enum MemoryBudget {
    /// Bytes that can still be allocated: `MemAvailable`, or less if this process's cgroup (v2)
    /// has a `memory.max`. Nil when neither can be read.
    static func available() -> (bytes: UInt64, source: String)? {
        var best: (bytes: UInt64, source: String)?
        if let free = meminfo("MemAvailable") { best = (free, "MemAvailable in /proc/meminfo") }
        if let group = cgroupHeadroom(), group.bytes < (best?.bytes ?? .max) { best = group }
        return best
    }

    /// Physical memory (`MemTotal`).
    static func physical() -> UInt64? { meminfo("MemTotal") }

    /// The bytes a set of segments reserves when created: each one's whole file, unless it opted out.
    static func reservation(of definitions: [SegmentDefinition]) -> UInt64 {
        definitions.filter(\.reservesMemory).reduce(0) { $0 &+ UInt64($1.layout.totalSize) }
    }

    /// Refuses `definitions` (segments about to be created) if their reservation exceeds what is available.
    static func check(_ definitions: [SegmentDefinition]) throws(Shortage) {
        let needed = reservation(of: definitions)
        guard needed > 0, let (available, source) = available(), needed > available else { return }
        let largest = definitions.filter(\.reservesMemory).max { $0.layout.totalSize < $1.layout.totalSize }!
        throw .insufficient(needed: needed, available: available, source: source, largest: largest.name,
                            largestBytes: UInt64(largest.layout.totalSize), slots: largest.slots, capacity: UInt64(largest.capacity))
    }

    /// A warning when segments left sparse (`"reserve": false`) could, once written, take more
    /// memory than the owner may have: the kernel then OOM-kills the owner in the middle of a
    /// publish (in a memory cgroup, silently). Nil when they fit.
    ///
    /// - Parameter definitions: every configured segment (reserved ones count as already taken).
    static func sparseRisk(_ definitions: [SegmentDefinition]) -> String? {
        let sparse = definitions.filter { !$0.reservesMemory }
        guard !sparse.isEmpty else { return nil }
        let sparseBytes = sparse.reduce(0) { $0 &+ UInt64($1.layout.totalSize) }
        let reserved = reservation(of: definitions)
        var limit: (bytes: UInt64, source: String)? = physical().map { ($0, "physical memory (MemTotal)") }
        if let group = cgroupLimit(), group.bytes < (limit?.bytes ?? .max) { limit = group }
        guard let limit, reserved &+ sparseBytes > limit.bytes else { return nil }
        let largest = sparse.max { $0.layout.totalSize < $1.layout.totalSize }!
        return "\(sparse.count) segment\(sparse.count == 1 ? "" : "s") with \"reserve\": false may grow to \(bytes(sparseBytes)) "
            + "(the largest, \"\(largest.name)\", to \(bytes(UInt64(largest.layout.totalSize)))); with the \(bytes(reserved)) reserved "
            + "that is more than the \(bytes(limit.bytes)) of \(limit.source). Once written that far, the kernel kills the owner "
            + "(an OOM kill, in a cgroup without a word); reserve them, shrink them, or raise the limit"
    }

    /// Why segments could not be given their memory.
    enum Shortage: Error, CustomStringConvertible {
        case insufficient(needed: UInt64, available: UInt64, source: String, largest: String, largestBytes: UInt64, slots: Int, capacity: UInt64)
        case cannotReserve(segment: String, bytes: UInt64, error: Errno)

        var description: String {
            switch self {
            case let .insufficient(needed, available, source, largest, largestBytes, slots, capacity):
                return "the segments reserve \(bytes(needed)) but only \(bytes(available)) can be allocated (\(source)); "
                    + "the largest is \"\(largest)\": \(bytes(largestBytes)) (\(slots) slots of \(bytes(capacity)) plus headers and checksum tables). "
                    + "Shrink segments, or set \"reserve\": false on those meant to stay sparse"
            case let .cannotReserve(segment, size, error):
                return "cannot reserve \(bytes(size)) for segment \"\(segment)\": \(error)"
            }
        }
    }

    static func bytes(_ count: UInt64) -> String {
        let units: [(UInt64, String)] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        for (size, name) in units where count >= size {
            return String(format: "%.1f %@ (%llu bytes)", Double(count) / Double(size), name, count)
        }
        return "\(count) bytes"
    }

    private static func meminfo(_ key: String) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix(key + ":") }),
              let kib = line.split(separator: " ").dropFirst().first.flatMap({ UInt64($0) }) else { return nil }
        return kib * 1024
    }

    /// This process's memory cgroup limit (v2 `memory.max`, v1 `memory.limit_in_bytes`), if any.
    private static func cgroupLimit() -> (bytes: UInt64, source: String)? {
        cgroupMemory().map { ($0.limit, $0.source) }
    }

    private static func cgroupHeadroom() -> (bytes: UInt64, source: String)? {
        cgroupMemory().map { ($0.limit > $0.usage ? $0.limit - $0.usage : 0, $0.source) }
    }

    private static func cgroupMemory() -> (limit: UInt64, usage: UInt64, source: String)? {
        guard let membership = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else { return nil }
        func read(_ path: String) -> UInt64? {
            (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        for line in membership.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            let group = String(fields[2])
            // cgroup v2 ("0::PATH", memory.max is "max" without a limit) or v1's memory controller.
            let (directory, limitFile, usageFile): (String, String, String)
            if fields[0] == "0" && fields[1].isEmpty {
                (directory, limitFile, usageFile) = ("/sys/fs/cgroup" + group, "memory.max", "memory.current")
            } else if fields[1].split(separator: ",").contains("memory") {
                (directory, limitFile, usageFile) = ("/sys/fs/cgroup/memory" + group, "memory.limit_in_bytes", "memory.usage_in_bytes")
            } else {
                continue
            }
            // v1 reports "no limit" as a huge number: anything above physical memory is no limit.
            guard let limit = read(directory + "/" + limitFile), limit < (physical() ?? .max) else { continue }
            let usage = read(directory + "/" + usageFile) ?? 0
            return (limit, usage, "\(limitFile) of cgroup \(group)")
        }
        return nil
    }
}
