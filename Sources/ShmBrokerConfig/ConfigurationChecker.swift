import Foundation
import ShmBrokerCore
import ShmBrokerPlatform

/// Walks a JSON config tree, recording every problem with its JSON path rather than stopping at
/// the first: the daemon's config and `shmbroker-mirror`'s are checked with it, with the same
/// rules for unknown keys, numbers and `${VAR}` expansion.
public struct ConfigurationChecker {
    /// Where `${NAME}` is looked up.
    public let environment: [String: String]
    /// What was found wrong so far.
    public private(set) var problems: [ConfigurationProblem] = []

    public init(environment: [String: String]) {
        self.environment = environment
    }

    public mutating func problem(_ path: String, _ message: String) {
        problems.append(ConfigurationProblem(path: path, message: message))
    }

    /// The members of an object, reporting unknown and duplicate keys.
    public mutating func members(_ value: JSONValue, at path: String, allowed: [String], required: [String] = []) -> [String: JSONValue]? {
        guard case .object(let pairs) = value else {
            problem(path, "expected an object, found \(value.typeName)")
            return nil
        }
        var result: [String: JSONValue] = [:]
        for (key, member) in pairs {
            if !allowed.contains(key) {
                problem("\(path).\(key)", "unknown key (allowed: \(allowed.joined(separator: ", ")))")
            } else if result[key] != nil {
                problem("\(path).\(key)", "duplicate key")
            } else {
                result[key] = member
            }
        }
        for key in required where result[key] == nil {
            problem("\(path).\(key)", "required key is missing")
        }
        return result
    }

    public mutating func string(_ value: JSONValue, at path: String) -> String? {
        guard case .string(let text) = value else {
            problem(path, "expected a string, found \(value.typeName)")
            return nil
        }
        return text
    }

    public mutating func integer(_ value: JSONValue, at path: String, in range: ClosedRange<Int>) -> Int? {
        guard case .number(let text) = value else {
            problem(path, "expected a whole number, found \(value.typeName)")
            return nil
        }
        guard let number = Int(text) else {
            problem(path, Self.whyNotAnInteger(text) + " (\(range.lowerBound)...\(range.upperBound))")
            return nil
        }
        guard range.contains(number) else {
            problem(path, "\(number) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return number
    }

    /// Says precisely why a JSON number is not an `Int`: a fraction, exponent notation, or too large.
    static func whyNotAnInteger(_ text: String) -> String {
        if text.contains(where: { $0 == "e" || $0 == "E" }) {
            return "expected a whole number written with digits only, found \(text) (exponent notation)"
        }
        if text.contains(".") { return "expected a whole number, found the fraction \(text)" }
        return "the number \(text.prefix(40))\(text.count > 40 ? "…" : "") is far out of range"
    }

    /// Expands `${NAME}` and `${NAME:-default}` from the environment.
    public mutating func expand(_ text: String, at path: String) -> String? {
        var result = ""
        var rest = Substring(text)
        while let start = rest.range(of: "${") {
            result += rest[..<start.lowerBound]
            guard let end = rest[start.upperBound...].firstIndex(of: "}") else {
                problem(path, "unterminated '${' in \"\(text)\"")
                return nil
            }
            let expression = rest[start.upperBound..<end]
            let parts = expression.split(separator: ":-", maxSplits: 1, omittingEmptySubsequences: false)
            let name = String(parts[0])
            if let value = environment[name], !value.isEmpty {
                result += value
            } else if parts.count == 2 {
                result += parts[1]
            } else {
                problem(path, "environment variable \(name) is not set (write ${\(name):-default} to give a fallback)")
                return nil
            }
            rest = rest[rest.index(after: end)...]
        }
        return result + rest
    }

    /// A number of seconds in `range` (a JSON number, fractions allowed).
    public mutating func seconds(_ value: JSONValue, at path: String, in range: ClosedRange<Double>) -> Double? {
        guard case .number(let text) = value, let seconds = Double(text), range.contains(seconds) else {
            problem(path, "expected a number of seconds in \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return seconds
    }

    /// A string, with `${VAR}` expanded.
    public mutating func expandedString(_ value: JSONValue, at path: String) -> String? {
        string(value, at: path).flatMap { expand($0, at: path) }
    }

    /// Reads a JSON config file (a UTF-8 byte-order mark, which some editors write, is skipped).
    ///
    /// - Throws: ``ConfigurationError`` if it does not exist, cannot be read, or is not JSON.
    public static func parseFile(_ path: String) throws(ConfigurationError) -> JSONValue {
        guard let data = FileManager.default.contents(atPath: path) else {
            let reason = FileManager.default.fileExists(atPath: path) ? "cannot be read" : "does not exist"
            throw ConfigurationError(file: path, problems: [ConfigurationProblem(path: "$", message: "the file \(reason)")])
        }
        return try parse(Array(data), file: path)
    }

    /// Parses config text as JSON (a UTF-8 byte-order mark is skipped).
    public static func parse(_ text: [UInt8], file: String) throws(ConfigurationError) -> JSONValue {
        let text = text.starts(with: [0xEF, 0xBB, 0xBF]) ? Array(text.dropFirst(3)) : text
        do {
            return try JSONValue.parse(text)
        } catch {
            throw ConfigurationError(file: file, problems: [ConfigurationProblem(path: "$", message: "invalid JSON at \(error)")])
        }
    }

    /// The problems, capped as ``ConfigurationError`` reports them, for `file`.
    public func error(file: String) -> ConfigurationError {
        ConfigurationError(file: file, problems: ConfigurationError.capped(problems))
    }
}
