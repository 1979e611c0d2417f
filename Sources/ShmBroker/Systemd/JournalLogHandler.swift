import CSystemd
import Foundation
import Logging
import ShmBrokerPlatform
import SystemPackage

/// A swift-log handler that writes one line per message to stderr with journald's `<N>` syslog
/// priority prefix, so `journalctl -p err` filters correctly when the daemon runs under systemd.
public struct JournalLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String) {
        self.label = label
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// The syslog priority journald associates with a swift-log level.
    public static func priority(of level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    /// Whether standard error is the journal (systemd sets `JOURNAL_STREAM` to its device and
    /// inode): then entries go to journald natively, with their metadata as fields.
    static let stderrIsJournal: Bool = {
        guard let value = ProcessInfo.processInfo.environment["JOURNAL_STREAM"] else { return false }
        let parts = value.split(separator: ":").compactMap { UInt64($0) }
        guard parts.count == 2,
              let info = try? FileSystem.entry(of: FileDescriptor.standardError, path: "standard error") else { return false }
        return info.device == parts[0] && info.inode == parts[1]
    }()

    /// Journal field names for the metadata keys the owner uses, so that for example
    /// `journalctl -u shmbroker SEGMENT=telemetry` selects one segment's entries.
    static let fieldNames: [String: String] = [
        "segment": "SEGMENT", "pid": "CLIENT_PID", "uid": "CLIENT_UID", "code": "ERROR_CODE", "client": "CLIENT_ID",
    ]

    /// A journal field name for a metadata key: the known ones, else the key in upper case with
    /// anything but letters, digits and `_` replaced (journald's rule).
    static func fieldName(_ key: String) -> String {
        if let known = fieldNames[key] { return known }
        let name = String(key.uppercased().map { $0.isASCII && ($0.isLetter || $0.isNumber) ? $0 : "_" })
        return name.first?.isLetter == true ? "SHMBROKER_" + name : "SHMBROKER_X" + name
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if Self.stderrIsJournal {
            var fields = ["MESSAGE=\(event.message)", "PRIORITY=\(Self.priority(of: event.level))", "SYSLOG_IDENTIFIER=\(label)"]
            fields += merged.sorted { $0.key < $1.key }.map { "\(Self.fieldName($0.key))=\($0.value)" }
            if !merged.isEmpty {
                // The readable line keeps the metadata too, as `journalctl` shows only MESSAGE.
                fields[0] += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            }
            if Self.send(fields) { return }
        }
        var line = "<\(Self.priority(of: event.level))>\(event.message)"
        if !merged.isEmpty {
            line += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        line += "\n"
        // One write per line keeps lines whole when several processes share the journal stream.
        line.utf8CString.withUnsafeBufferPointer { buffer in
            _ = Foundation.write(STDERR_FILENO, buffer.baseAddress, buffer.count - 1)
        }
    }

    /// `sd_journal_sendv` with one field per entry; false if journald refused (then stderr is used).
    static func send(_ fields: [String]) -> Bool {
        var joined: [UInt8] = []
        var ranges: [Range<Int>] = []
        for field in fields {
            let start = joined.count
            joined += field.utf8
            ranges.append(start..<joined.count)
        }
        return joined.withUnsafeMutableBytes { bytes in
            var vectors = ranges.map { iovec(iov_base: bytes.baseAddress! + $0.lowerBound, iov_len: $0.count) }
            return vectors.withUnsafeMutableBufferPointer { sd_journal_sendv($0.baseAddress, Int32($0.count)) == 0 }
        }
    }
}
