import ArgumentParser
import Foundation
import ShmBrokerClient
import ShmBrokerConfig
import ShmBrokerCore
import ShmBrokerProtocol

/// Exit codes beyond ArgumentParser's (0 success, 1 failure, 64 usage).
enum ExitStatus {
    static let neverPublished: Int32 = 3
    static let checksumMismatch: Int32 = 4
}

/// How every subcommand finds the daemon: `--socket`, else `$SHMBROKER_SOCKET`, else the socket
/// named in `--config`, else the socket named in the default config — the file the daemon reads.
struct ConnectionOptions: ParsableArguments {
    @Option(name: .long, help: "The daemon's control socket.")
    var socket: String?

    @Option(name: .long, help: "Read the socket path from this daemon config (default: \(BrokerConfiguration.defaultPath)).")
    var config: String?

    func socketPath() throws -> String {
        if let socket { return socket }
        if config == nil, let fromEnvironment = ProcessInfo.processInfo.environment["SHMBROKER_SOCKET"], !fromEnvironment.isEmpty {
            return fromEnvironment
        }
        let path = config ?? BrokerConfiguration.defaultPath
        do {
            return try BrokerConfiguration.load(path: path).socket.path
        } catch {
            throw CleanExit.message("shmbrokerctl: no --socket given and \(error.description)")
        }
    }

    func connect() async throws -> ShmBrokerClient {
        try await ShmBrokerClient.connect(socketPath: try socketPath(), clientName: "shmbrokerctl")
    }
}

/// Prints to stderr and exits with `code`.
func fail(_ message: String, code: Int32 = 1) -> ExitCode {
    FileHandle.standardError.write(Data("shmbrokerctl: \(message)\n".utf8))
    return ExitCode(code)
}

func formatTime(_ seconds: Double?) -> String {
    guard let seconds else { return "never" }
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return formatter.string(from: Date(timeIntervalSince1970: seconds))
}

/// Writes a line to stdout at once (no stdio buffering), so `watch` output streams into pipes.
func emitLine(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

func hex(_ value: UInt64) -> String { String(format: "%016llx", value) }

@main
struct ShmBrokerCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbrokerctl",
        abstract: "Inspect, read, publish to and watch shmbroker segments.",
        subcommands: [Status.self, List.self, Read.self, Publish.self, Watch.self, Metrics.self, Top.self])
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the daemon, its segments, clients and counters.")
    @OptionGroup var connection: ConnectionOptions
    @Flag(name: .long, help: "Print the daemon's JSON status report.") var json = false

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        if json {
            FileHandle.standardOutput.write(Data(try await client.statusJSON() + [0x0A]))
            return
        }
        let report = try await client.status()
        print("\(report.daemon.name) \(report.daemon.version), pid \(report.daemon.pid), up since \(formatTime(report.daemon.startedAt))")
        print("config \(report.daemon.configPath), socket \(report.daemon.socketPath)")
        print("")
        printSegmentTable(report.segments)
        print("")
        print("\(report.clients.count) client(s) connected")
        let c = report.counters
        print("publishes \(c.publishes), events sent \(c.eventsSent) (coalesced \(c.eventsCoalesced)), slow subscribers disconnected \(c.slowSubscribersDisconnected)")
        print("malformed requests \(c.malformedRequests), error replies \(c.errorReplies), reloads \(c.reloads) (failed \(c.failedReloads))")
    }
}

struct Metrics: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the owner's metrics in the Prometheus text format.",
        discussion: "Shown under STATUS's access rules: a segment's series only to users its readers list admits.")
    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let text = try await client.metrics()
        FileHandle.standardOutput.write(Data(text.utf8))
        if !text.hasSuffix("\n") { FileHandle.standardOutput.write(Data("\n".utf8)) }
    }
}

func printSegmentTable(_ segments: [StatusReport.Segment]) {
    let header = ["NAME", "CAPACITY", "VERSION", "LENGTH", "CRC64", "READERS", "SUBSCRIBERS", "LAST PUBLISH"]
    let rows = segments.map {
        [$0.name, "\($0.capacity)", "\($0.version)", "\($0.length)", $0.crc64, "\($0.readers)", "\($0.subscribers)", formatTime($0.lastPublishedAt)]
    }
    let widths = header.indices.map { column in ([header] + rows).map { $0[column].count }.max() ?? 0 }
    for row in [header] + rows {
        print(row.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  "))
    }
    for segment in segments {
        guard let mirror = segment.mirror else { continue }
        print("\(segment.name): mirror of \(mirror.sourceHost)/\(mirror.sourceSegment), source version \(mirror.sourceVersion), "
              + "lag \(mirror.lagVersions) versions / \(String(format: "%.2f", mirror.lagSeconds)) s, "
              + (mirror.stale ? "STALE since \(formatTime(mirror.staleSince))" : "fresh")
              + ", last heartbeat \(formatTime(mirror.lastHeartbeatAt))")
    }
}

/// " (mirror)" or " (STALE)" after a mirrored segment's name; nothing for a local one.
func mirrorMark(_ mirror: StatusReport.Mirror?) -> String {
    guard let mirror else { return "" }
    return mirror.stale ? " (STALE)" : " (mirror)"
}

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List segments with their capacity and current version.")
    @OptionGroup var connection: ConnectionOptions
    @Flag(name: .long, help: "Print a JSON array.") var json = false

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let segments = try await client.status().segments
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            FileHandle.standardOutput.write(try encoder.encode(segments) + Data([0x0A]))
        } else {
            printSegmentTable(segments)
        }
    }
}

struct Read: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a segment's latest verified version to stdout or a file.",
        discussion: "Exits \(ExitStatus.neverPublished) if nothing was ever published, \(ExitStatus.checksumMismatch) on a CRC-64 mismatch.")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The segment name.") var name: String
    @Option(name: .shortAndLong, help: "Write the content here instead of stdout.") var output: String?
    @Flag(name: .long, help: "Print version, length and CRC-64 to stderr.") var verbose = false

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let segment = try await client.open(name)
        let snapshot: SegmentSnapshot?
        do {
            snapshot = try segment.read()
        } catch ShmBrokerClientError.segment(let error) {
            if case .checksumMismatch = error { throw fail("\(name): \(error)", code: ExitStatus.checksumMismatch) }
            throw fail("\(name): \(error)")
        }
        guard let snapshot else {
            throw fail("segment \(name) is empty: nothing has been published yet", code: ExitStatus.neverPublished)
        }
        let data = Data(snapshot.bytes)
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: data) else { throw fail("cannot write \(output)") }
        } else {
            FileHandle.standardOutput.write(data)
        }
        if segment.isStale {
            FileHandle.standardError.write(Data("warning: \(name) is stale: it mirrors another host's segment whose source has gone quiet; version \(snapshot.version) may be old\n".utf8))
        }
        if verbose {
            FileHandle.standardError.write(Data("\(name): version \(snapshot.version), \(snapshot.bytes.count) bytes, crc64 \(hex(snapshot.crc64)), published \(formatTime(Double(snapshot.publishedAtNanoseconds) / 1e9))\n".utf8))
        }
    }
}

struct Publish: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Publish a file (or stdin) as a segment's next version.")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The segment name.") var name: String
    @Argument(help: "The file to publish, or - for stdin.") var file: String = "-"
    @Flag(name: .long, help: "Print the receipt as JSON.") var json = false
    @Flag(name: .long, help: """
        Publish every line of the input as its own version, as it arrives (newline not included), \
        through a publish ring: for feeding a segment from a pipeline.
        """) var lines = false

    func run() async throws {
        if lines { return try await publishLines() }
        let data: Data
        if file == "-" {
            data = FileHandle.standardInput.readDataToEndOfFile()
        } else {
            guard let contents = FileManager.default.contents(atPath: file) else { throw fail("cannot read \(file)") }
            data = contents
        }
        let client = try await connection.connect()
        defer { client.close() }
        let receipt = try await client.publish(name, bytes: Array(data))
        if json {
            print("{\"segment\":\"\(name)\",\"version\":\(receipt.version),\"length\":\(receipt.length),\"crc64\":\"\(hex(receipt.crc64))\"}")
        } else {
            print("\(name): published version \(receipt.version) (\(receipt.length) bytes, crc64 \(hex(receipt.crc64)))")
        }
    }

    /// Streams the input line by line into a publish ring; lines published before an error stay
    /// published, and the error names the line that was refused.
    func publishLines() async throws {
        let input: FileHandle
        if file == "-" {
            input = FileHandle.standardInput
        } else {
            guard let opened = FileHandle(forReadingAtPath: file) else { throw fail("cannot read \(file)") }
            input = opened
        }
        let client = try await connection.connect()
        defer { client.close() }
        let publisher = try await client.openPublisher(name)
        var pending: [UInt8] = []
        var published = 0
        func publish(_ line: ArraySlice<UInt8>) throws {
            do {
                try publisher.publish(Array(line))
            } catch {
                throw fail("line \(published + 1) (\(line.count) bytes) was not published: \(error); \(published) lines before it were")
            }
            published += 1
        }
        while true {
            let chunk = input.availableData
            if chunk.isEmpty { break }
            pending.append(contentsOf: chunk)
            var start = pending.startIndex
            while let newline = pending[start...].firstIndex(of: 0x0A) {
                try publish(pending[start..<newline])
                start = newline + 1
            }
            pending.removeSubrange(..<start)
        }
        if !pending.isEmpty { try publish(pending[...]) }  // a last line without its newline
        let results = try publisher.flush(timeoutNanoseconds: 60_000_000_000)
        await publisher.close()
        if json {
            print("{\"segment\":\"\(name)\",\"published\":\(published),\"version\":\(results.lastVersion),\"length\":\(results.lastLength),\"crc64\":\"\(hex(results.lastCRC64))\"}")
        } else {
            print("\(name): published \(published) lines; latest version \(results.lastVersion) (\(results.lastLength) bytes, crc64 \(hex(results.lastCRC64)))")
        }
    }
}

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a line for each new version of a segment.",
        discussion: """
            Events carry the latest version: a watcher that falls behind (or a publisher faster than \
            the events) skips versions. Each line says how many were skipped since the previous one \
            (skipped=N; "skipped" in --json), and the last line before exit gives the total.
            """)
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The segment name.") var name: String
    @Option(name: .long, help: "Exit after this many versions.") var count: Int?
    @Flag(name: .long, help: "Print each version as a JSON line.") var json = false

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let subscription = try await client.subscribe(name)
        var seen = 0
        var previous = subscription.initialVersion
        var totalSkipped: UInt64 = 0
        for await event in subscription {
            switch event {
            case .version(let info):
                // Versions between the previous event's and this one were published but not announced to us.
                let skipped = info.version > previous + 1 ? info.version - previous - 1 : 0
                totalSkipped += skipped
                previous = max(previous, info.version)
                if json {
                    emitLine("{\"segment\":\"\(name)\",\"version\":\(info.version),\"length\":\(info.length),\"crc64\":\"\(hex(info.crc64))\",\"publishedAt\":\(Double(info.publishedAtNanoseconds) / 1e9),\"skipped\":\(skipped)}")
                } else {
                    emitLine("\(name) version=\(info.version) length=\(info.length) crc64=\(hex(info.crc64)) published=\(formatTime(Double(info.publishedAtNanoseconds) / 1e9))"
                             + (skipped > 0 ? " skipped=\(skipped)" : ""))
                }
                seen += 1
                if let count, seen >= count {
                    if totalSkipped > 0 && !json {
                        FileHandle.standardError.write(Data("\(name): \(totalSkipped) versions were published between the \(seen) shown\n".utf8))
                    }
                    return
                }
            case .retired:
                throw fail("segment \(name) was retired by the daemon")
            case .stale, .fresh:
                // A mirrored segment's source went quiet, or was heard again (docs/MIRROR.md).
                let stale = event == .stale
                emitLine(json ? "{\"segment\":\"\(name)\",\"stale\":\(stale)}"
                              : "\(name) \(stale ? "STALE: its source has gone quiet; the latest version may be old" : "fresh again")")
            }
        }
        throw fail("the daemon closed the connection")
    }
}
