import ArgumentParser
import Foundation
import Logging
import ShmBroker
import ShmBrokerMirror

/// `shmbroker-mirror`: carries segments to and from other hosts through a NATS JetStream cluster.
struct MirrorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbroker-mirror",
        abstract: "Mirrors shmbroker segments across hosts through a NATS JetStream key-value bucket.",
        discussion: "See docs/MIRROR.md and shmbroker-mirror(8).",
        version: BrokerServer.version)

    @Option(name: .long, help: "The JSON config file.")
    var config: String = MirrorConfiguration.defaultPath

    @Flag(name: .long, help: "Validate the config, print every problem with its JSON path, and exit 0 (valid) or 1 (invalid).")
    var checkConfig = false

    @Option(name: .long, help: "Write the metrics here (Prometheus text format) every 2 s.")
    var metricsTextfile: String?

    @Option(name: .long, help: "Lowest log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown log level '\(logLevel)'") }
    }

    func run() throws {
        let configuration: MirrorConfiguration
        do {
            configuration = try MirrorConfiguration.load(path: config)
        } catch {
            FileHandle.standardError.write(Data("\(error)\n".utf8))
            throw ExitCode(1)
        }
        if checkConfig {
            print("\(config): valid (host \(configuration.host), \(configuration.export?.segments.count ?? 0) exported, \(configuration.imports.count) imported)")
            return
        }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        var logger = Logger(label: "shmbroker-mirror") { JournalLogHandler(label: $0) }
        logger.logLevel = level
        let mirror = try Mirror(configuration: configuration, logger: logger, metricsTextfile: metricsTextfile)
        throw ExitCode(mirror.run())
    }
}

MirrorCommand.main()
