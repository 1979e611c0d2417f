import Foundation
import ShmBrokerConfig
import ShmBrokerProtocol

// Fuzz harnesses for what parses untrusted input: the control protocol's frame decoder (every
// peer's bytes) and the config loader (an operator's file). Each input must be decoded or refused
// with an error; a crash, a trap or a hang is a bug.
//
// `Tests/ShmBrokerFuzz/fuzz.sh` compiles this module with libFuzzer's instrumentation and
// `-D FUZZING` (which adds LLVMFuzzerTestOneInput) and links it into a fuzzer; the executable
// `shmbroker-fuzz` replays inputs through the same functions: `shmbroker-fuzz frame|config PATH...`.

/// Decodes one frame as the daemon and a client would: header, then the body as a request and
/// as a server message (whichever the type names), re-encoding what decodes.
public func fuzzFrame(_ bytes: UnsafeRawBufferPointer) {
    guard let header = try? FrameHeader.parse(bytes) else { return }
    let body = Frame.body(of: bytes)
    if let request = try? Request.decode(type: header.type, body: body) {
        let encoded = request.encode(requestID: header.requestID)
        // What decodes must re-encode to a frame that decodes to the same request.
        let again = encoded.withUnsafeBytes { frame in
            (try? FrameHeader.parse(frame)).flatMap { try? Request.decode(type: $0.type, body: Frame.body(of: frame)) }
        }
        precondition(again == request, "a request did not survive re-encoding")
    }
    _ = try? ServerMessage.decode(type: header.type, body: body)
}

/// Loads one config text, with an environment that makes `${VAR}` expansion reachable.
public func fuzzConfig(_ bytes: UnsafeRawBufferPointer) {
    _ = try? BrokerConfiguration.parse(Array(bytes), file: "fuzz.json",
                                       environment: ["RUNTIME": "/run", "STATE_DIRECTORY": "/var/lib/x"])
}

#if FUZZING
/// Which harness the libFuzzer driver runs: `SHMBROKER_FUZZ_TARGET=frame` or `config`.
let fuzzTarget = ProcessInfo.processInfo.environment["SHMBROKER_FUZZ_TARGET"] ?? "frame"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    if fuzzTarget == "config" { fuzzConfig(bytes) } else { fuzzFrame(bytes) }
    return 0
}
#endif
