import ArgumentParser
import Logging
import ShmBrokerConfig
import ShmBroker

/// `shmbrokerd`: the shared-memory broker daemon.
struct ShmBrokerDaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbrokerd",
        abstract: "Owns named shared-memory segments and serves readers over a Unix control socket.",
        version: BrokerServer.version)

    @Option(name: .long, help: "The JSON config file.")
    var config: String = BrokerConfiguration.defaultPath

    @Flag(name: .long, help: "Validate the config, print every problem, and exit 0 (valid) or 1 (invalid).")
    var checkConfig = false

    @Option(name: .long, help: "Lowest log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Flag(name: .customLong("debug-allow-hang"), help: .hidden)
    var debugAllowHang = false

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("unknown log level '\(logLevel)'")
        }
    }

    func run() throws {
        let code = checkConfig
            ? DaemonLauncher.checkConfig(path: config)
            : DaemonLauncher.run(configPath: config, logLevel: Logger.Level(rawValue: logLevel) ?? .info,
                                 allowDebugHang: debugAllowHang)
        throw ExitCode(code)
    }
}

ShmBrokerDaemonCommand.main()
