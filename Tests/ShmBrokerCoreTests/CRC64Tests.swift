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

    func testSlicingMatchesReferenceOverLengthsAndAlignments() {
        var generator = SystemRandomNumberGenerator()
        let buffer = (0..<4200).map { _ in UInt8.random(in: 0...255, using: &generator) }
        buffer.withUnsafeBytes { all in
            for start in 0..<9 {
                for length in Array(0...80) + [511, 1000, 4096] {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<start + length])
                    XCTAssertEqual(CRC64.checksum(slice), CRC64.referenceChecksum(slice), "start \(start) length \(length)")
                }
            }
        }
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
