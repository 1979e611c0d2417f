import Foundation
import Logging
import ShmBrokerConfig
import ShmBrokerPlatform

/// What `shmbrokerd` does, kept in the library so the executable stays a thin argument parser.
public enum DaemonLauncher {
    /// Validates a config file, printing every problem. Returns the process exit code.
    public static func checkConfig(path: String) -> Int32 {
        do {
            let configuration = try BrokerConfiguration.load(path: path)
            print("\(path): OK (\(configuration.segments.count) segment\(configuration.segments.count == 1 ? "" : "s"), socket \(configuration.socket.path))")
            let reserved = MemoryBudget.reservation(of: configuration.segments)
            if let physical = MemoryBudget.physical(), reserved > physical {
                print("warning: the segments reserve \(MemoryBudget.bytes(reserved)), more than this machine's \(MemoryBudget.bytes(physical)) of memory; "
                      + "the daemon will refuse to start here (set \"reserve\": false on segments meant to stay sparse)")
            }
            if let risk = MemoryBudget.sparseRisk(configuration.segments) { print("warning: " + risk) }
            return 0
        } catch {
            FileHandle.standardError.write(Data((error.description + "\n").utf8))
            return 1
        }
    }

    /// One descriptor per client and per segment: lift the soft limit to the hard one
    /// (`LimitNOFILE=` in the unit sets the hard limit).
    static func raiseDescriptorLimit() {
        ResourceLimits.raiseOpenFilesToMaximum()
    }

    /// Runs the daemon in the foreground until SIGTERM or SIGINT. Returns the process exit code.
    ///
    /// - Parameters:
    ///   - givenPath: the config file (`--config`, relative to the working directory or absolute);
    ///     SIGHUP re-reads it.
    ///   - logLevel: the lowest level logged.
    ///   - allowDebugHang: let SIGUSR2 hang the event loop (for watchdog tests only).
    public static func run(configPath givenPath: String, logLevel: Logger.Level, allowDebugHang: Bool = false) -> Int32 {
        let configPath = URL(fileURLWithPath: givenPath).standardizedFileURL.path
        // Before anything can start a thread: signals must be blocked everywhere so that only the
        // signalfd sees them.
        let signals: SignalDescriptor
        do {
            signals = try SignalDescriptor(signals: [SIGTERM, SIGINT, SIGHUP, SIGUSR2])
        } catch {
            FileHandle.standardError.write(Data("<3>cannot create signalfd: \(error)\n".utf8))
            return 1
        }
        ProcessSignals.ignoreBrokenPipe()
        raiseDescriptorLimit()
        LoggingSystem.bootstrap { label in
            var handler = JournalLogHandler(label: label)
            handler.logLevel = logLevel
            return handler
        }
        let logger = Logger(label: "shmbrokerd")
        let notifier = SystemdNotifier()
        let configuration: BrokerConfiguration
        do {
            configuration = try BrokerConfiguration.load(path: configPath)
        } catch {
            for problem in error.problems { logger.critical("config \(error.file): \(problem)") }
            notifier.notify("STATUS=invalid configuration \(configPath)\nERRNO=22")
            return 1
        }
        do {
            let server = try BrokerServer(configuration: configuration, configPath: configPath, signals: signals, logger: logger,
                                          notifier: notifier, inherited: InheritedDescriptors.takeFromSystemd(),
                                          allowDebugHang: allowDebugHang)
            try server.start()
            try server.run()
            logger.info("stopped cleanly")
            return 0
        } catch {
            logger.critical("fatal: \(error)")
            notifier.notify("STATUS=failed: \(error)")
            return 1
        }
    }
}
