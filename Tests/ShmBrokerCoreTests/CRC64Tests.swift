import ShmBrokerCore
import XCTest

final class CRC64Tests: XCTestCase {
    func testCheckValue() {
        XCTAssertEqual(CRC64.checksum(Array("123456789".utf8)), 0x995D_C9BB_DF19_39FA)
        XCTAssertEqual(Array("123456789".utf8).withUnsafeBytes { CRC64.referenceChecksum($0) }, 0x995D_C9BB_DF19_39FA)
    }

    func testEmptyInput() {
        XCTAssertEqual(CRC64.checksum([UInt8]()), 0)
    }

    /// Every implementation (folding where the CPU has it, the portable table, the fused copy)
    /// against the bit-at-a-time definition, over many lengths and unaligned starts.
    func testImplementationsMatchTheReferenceOverLengthsAndAlignments() {
        var generator = SystemRandomNumberGenerator()
        let buffer = (0..<4200).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let lengths = Array(0...300) + [511, 512, 513, 1000, 1023, 1024, 1025, 4096] + (0..<20).map { _ in Int.random(in: 0...4000) }
        var destination = [UInt8](repeating: 0, count: 4200)
        buffer.withUnsafeBytes { all in
            for start in 0..<17 {
                for length in lengths where start + length <= all.count {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<start + length])
                    let expected = CRC64.referenceChecksum(slice)
                    XCTAssertEqual(CRC64.checksum(slice), expected, "start \(start) length \(length)")
                    var portable = CRC64()
                    portable.updatePortably(slice)
                    XCTAssertEqual(portable.value, expected, "portable, start \(start) length \(length)")
                    let copied = destination.withUnsafeMutableBytes { CRC64.copyAndChecksum(from: slice, to: $0.baseAddress! + 3) }
                    XCTAssertEqual(copied, expected, "fused copy, start \(start) length \(length)")
                    XCTAssertEqual(Array(destination[3..<3 + length]), Array(slice), "fused copy bytes")
                    destination.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) }
                    let twoPass = destination.withUnsafeMutableBytes { CRC64.copyThenChecksum(from: slice, to: $0.baseAddress! + 5) }
                    XCTAssertEqual(twoPass, expected, "two-pass copy, start \(start) length \(length)")
                    XCTAssertEqual(Array(destination[5..<5 + length]), Array(slice), "two-pass copy bytes")
                }
            }
        }
    }

    /// Each implementation this CPU supports, forced, against the bit-at-a-time definition: every
    /// length from 0 to 4 KiB at several unaligned starts, for the checksum and the fused copy.
    func testEverySupportedPathMatchesTheReferenceAtEveryLengthUpTo4KiB() {
        print("CRC-64 paths supported here: \(CRC64.supportedPaths.map(\.description)); active: \(CRC64.activePath)")
        XCTAssertTrue(CRC64.supportedPaths.contains(.portable))
        XCTAssertTrue(CRC64.supportedPaths.contains(CRC64.activePath))
        var generator = SystemRandomNumberGenerator()
        let buffer = (0..<(4096 + 64)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        var destination = [UInt8](repeating: 0, count: 4096 + 64)
        for path in CRC64.supportedPaths {
            XCTAssertEqual(Array("123456789".utf8).withUnsafeBytes { CRC64.checksum($0, path: path) }, 0x995D_C9BB_DF19_39FA, "\(path)")
            buffer.withUnsafeBytes { all in
                for start in [0, 1, 3, 8, 15, 33, 63] {
                    var reference: UInt64 = ~0
                    for length in 0...4096 {
                        if length > 0 {
                            reference ^= UInt64(all[start + length - 1])
                            for _ in 0..<8 { reference = (reference & 1) != 0 ? (reference >> 1) ^ CRC64.reflectedPolynomial : reference >> 1 }
                        }
                        let slice = UnsafeRawBufferPointer(rebasing: all[start..<start + length])
                        let checked = CRC64.checksum(slice, path: path)
                        let copied = destination.withUnsafeMutableBytes { CRC64.copyAndChecksum(from: slice, to: $0.baseAddress! + 5, path: path) }
                        if checked != ~reference || copied != ~reference {
                            XCTFail("\(path): start \(start) length \(length): \(checked) / \(copied), expected \(~reference)")
                            return
                        }
                        if length % 251 == 0 {
                            XCTAssertEqual(Array(destination[5..<5 + length]), Array(slice), "\(path) copied bytes, length \(length)")
                        }
                    }
                }
            }
        }
    }

    /// Random lengths up to 16 MiB from unaligned starts: every supported path, checksum and
    /// fused copy, agrees with the portable tables (themselves checked against the reference above).
    func testEverySupportedPathAgreesOnRandomLengthsUpTo16MiB() {
        let size = (16 << 20) + 64
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        defer { source.deallocate(); destination.deallocate() }
        var generator = SystemRandomNumberGenerator()
        for index in stride(from: 0, to: size, by: 8) { source.storeBytes(of: generator.next(), toByteOffset: index, as: UInt64.self) }
        let lengths = [16 << 20, (1 << 20) + 1, 65_536 + 17] + (0..<5).map { _ in Int.random(in: 4097...(16 << 20), using: &generator) }
        for length in lengths {
            let start = Int.random(in: 0..<64, using: &generator)
            let slice = UnsafeRawBufferPointer(rebasing: source[start..<start + length])
            var portable = CRC64()
            portable.updatePortably(slice)
            for path in CRC64.supportedPaths where path != .portable {
                XCTAssertEqual(CRC64.checksum(slice, path: path), portable.value, "\(path), start \(start), length \(length)")
                let copied = CRC64.copyAndChecksum(from: slice, to: destination.baseAddress! + 3, path: path)
                XCTAssertEqual(copied, portable.value, "\(path) copy, start \(start), length \(length)")
                XCTAssertTrue(memcmp(destination.baseAddress! + 3, slice.baseAddress!, length) == 0, "\(path) copied bytes")
            }
        }
    }

    func testLargeInputsAgreeAcrossImplementations() {
        let big = (0..<(3 << 20) + 77).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        big.withUnsafeBytes { bytes in
            var portable = CRC64()
            portable.updatePortably(bytes)
            XCTAssertEqual(CRC64.checksum(bytes), portable.value)
        }
        print("CRC-64 hardware acceleration: \(CRC64.isHardwareAccelerated)")
    }

    func testIncrementalUpdatesEqualOneShot() {
        let bytes = Array((0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        var crc = CRC64()
        bytes.withUnsafeBytes { all in
            crc.update(UnsafeRawBufferPointer(rebasing: all[..<3]))
            crc.update(UnsafeRawBufferPointer(rebasing: all[3..<517]))
            crc.update(UnsafeRawBufferPointer(rebasing: all[517...]))
        }
        XCTAssertEqual(crc.value, CRC64.checksum(bytes))
    }
}

/// A copy's CRC is the CRC of the bytes stored, even while another thread keeps rewriting the
/// source (as a producer may do to its own publish ring while the daemon copies from it).
final class CopyUnderConcurrentWritesTests: XCTestCase {
    func testTheChecksumMatchesTheCopyWhileTheSourceChanges() {
        for length in [64, 100, 127, 128 + 15, 1000, 4096 + 7] {
            let source = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 64)
            let destination = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 64)
            defer { source.deallocate(); destination.deallocate() }
            source.initializeMemory(as: UInt8.self, repeating: 0)
            let running = ManagedFlag()
            nonisolated(unsafe) let target = source
            let scribbler = Thread {
                var value: UInt8 = 0
                while running.isSet {
                    for index in 0..<target.count { target[index] = value }
                    value &+= 1
                }
            }
            running.set(true)
            scribbler.start()
            var mismatches = 0
            for round in 0..<20_000 {
                let crc = round % 2 == 0 ? CRC64.copyAndChecksum(from: UnsafeRawBufferPointer(source), to: destination)
                                         : CRC64.copyThenChecksum(from: UnsafeRawBufferPointer(source), to: destination)
                if crc != CRC64.checksum(UnsafeRawBufferPointer(start: destination, count: length)) { mismatches += 1 }
            }
            running.set(false)
            while !scribbler.isFinished { usleep(1000) }
            XCTAssertEqual(mismatches, 0, "length \(length)")
        }
    }
}

final class ManagedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set(_ newValue: Bool) { lock.withLock { value = newValue } }
}
