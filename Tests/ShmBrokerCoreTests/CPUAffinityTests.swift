import Foundation
import ShmBrokerPlatform
import SystemPackage
import XCTest

/// Pinning a thread (for a spinning reader that owns a core), on a thread of its own so that the
/// test runner's threads keep every CPU.
final class CPUAffinityTests: XCTestCase {
    /// Runs `body` on a new thread and waits for it.
    func onOwnThread(_ body: @escaping @Sendable () -> Void) {
        let done = expectation(description: "thread finished")
        let thread = Thread {
            body()
            done.fulfill()
        }
        thread.start()
        wait(for: [done], timeout: 30)
    }

    func testAPinnedThreadRunsOnlyOnItsCPU() {
        let cpus = ProcessInfo.processInfo.activeProcessorCount
        for cpu in 0..<cpus {
            onOwnThread {
                do {
                    try CPUAffinity.pinCurrentThread(toCPU: cpu)
                    // Wherever it ran before, after the call and a few yields it runs on `cpu` only.
                    for _ in 0..<100 {
                        sched_yield()
                        XCTAssertEqual(try CPUAffinity.currentCPU(), cpu)
                    }
                } catch {
                    XCTFail("pinning to CPU \(cpu) of \(cpus): \(error)")
                }
            }
        }
    }

    func testACPUThatDoesNotExistIsRefused() {
        onOwnThread {
            for cpu in [-1, 1 << 20] {
                do throws(Errno) {
                    try CPUAffinity.pinCurrentThread(toCPU: cpu)
                    XCTFail("CPU \(cpu) was accepted")
                } catch {
                    XCTAssertEqual(error, .invalidArgument, "CPU \(cpu)")
                }
            }
        }
    }
}
