import Foundation
import ShmBrokerFuzzHarness

// Replays inputs (files, or every file of a directory) through a fuzz harness: for reproducing
// what `Tests/ShmBrokerFuzz/fuzz.sh` found.
/// Replays inputs (files, or every file of a directory) through a harness.
@main
struct Replay {
    static func main() {
        let arguments = CommandLine.arguments.dropFirst()
        guard let target = arguments.first, ["frame", "config"].contains(target), arguments.count >= 2 else {
            FileHandle.standardError.write(Data("usage: shmbroker-fuzz frame|config FILE_OR_DIRECTORY...\n".utf8))
            exit(2)
        }
        var replayed = 0
        for path in arguments.dropFirst() {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
                FileHandle.standardError.write(Data("shmbroker-fuzz: no such file \(path)\n".utf8))
                exit(2)
            }
            let files = isDirectory.boolValue
                ? ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted().map { path + "/" + $0 }
                : [path]
            for file in files {
                guard let data = FileManager.default.contents(atPath: file) else { continue }
                data.withUnsafeBytes { target == "config" ? fuzzConfig($0) : fuzzFrame($0) }
                replayed += 1
            }
        }
        print("replayed \(replayed) inputs through the \(target) harness")
    }
}
