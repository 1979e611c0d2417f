import Foundation
import ShmBrokerCore
import ShmBrokerProtocol
import XCTest

/// One source for the memory layout and the wire numbers: `SegmentLayout`, `PublishRingLayout`,
/// `MessageType` and `ErrorCode`. The C library's `shmbroker_wire.h` and the Python package's
/// `_wire.py` are generated from them (run this test with `SHMBROKER_REGENERATE=1` to rewrite
/// both), the public `shmbroker.h` must give the same error codes, and the tables of
/// `docs/LAYOUT.md` and `docs/PROTOCOL.md` must give the same offsets and codes. Changing a number
/// in any one of them fails this test.
final class WireConformanceTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    struct Constant {
        var name: String
        var value: UInt64
        var hex: Bool = true
    }

    /// Every number the client libraries need, grouped, named once.
    static var sections: [(title: String, constants: [Constant])] {
        typealias H = SegmentLayout.Header
        typealias S = SegmentLayout.Slot
        typealias R = PublishRingLayout.Header
        func c(_ name: String, _ value: Int, hex: Bool = true) -> Constant { Constant(name: name, value: UInt64(value), hex: hex) }
        return [
            ("Segment (docs/LAYOUT.md, \"Header\" and \"Slot\")", [
                Constant(name: "SEGMENT_MAGIC", value: SegmentLayout.magic),
                c("SEGMENT_LAYOUT_VERSION", Int(SegmentLayout.layoutVersion), hex: false),
                c("SEGMENT_HEADER_SIZE", SegmentLayout.headerSize, hex: false),
                c("SEGMENT_SLOT_HEADER_SIZE", SegmentLayout.slotHeaderSize, hex: false),
                c("SEGMENT_ALIGNMENT", SegmentLayout.alignment, hex: false),
                c("SEGMENT_MAX_NAME", SegmentLayout.maximumNameLength, hex: false),
                c("SEGMENT_MIN_SLOTS", SegmentLayout.slotCountRange.lowerBound, hex: false),
                c("SEGMENT_MAX_SLOTS", SegmentLayout.slotCountRange.upperBound, hex: false),
                c("SEGMENT_DEFAULT_CHECKSUM_BLOCK", SegmentLayout.defaultChecksumBlockSize, hex: false),
                c("SEGMENT_MIN_CHECKSUM_BLOCK", SegmentLayout.checksumBlockSizeRange.lowerBound, hex: false),
                c("SEGMENT_MAX_CHECKSUM_BLOCK", SegmentLayout.checksumBlockSizeRange.upperBound, hex: false),
                c("SEG_MAGIC", H.magic), c("SEG_LAYOUT_VERSION", H.layoutVersion), c("SEG_HEADER_SIZE", H.headerSize),
                c("SEG_CAPACITY", H.capacity), c("SEG_SLOT_COUNT", H.slotCount), c("SEG_FLAGS", H.flags),
                c("SEG_SLOT_STRIDE", H.slotStride), c("SEG_CREATED_AT", H.createdAt),
                c("SEG_CHECKSUM_BLOCK_SIZE", H.checksumBlockSize), c("SEG_NAME", H.name),
                c("SEG_LATEST_VERSION", H.latestVersion), c("SEG_FUTEX_WORD", H.futexWord),
                c("SEG_FLAG_RETIRED", Int(SegmentLayout.Flags.retired)), c("SEG_FLAG_SLEEPER_BOARD", Int(SegmentLayout.Flags.sleeperBoard)),
                c("SEG_FLAG_STALE", Int(SegmentLayout.Flags.stale)),
                c("SEG_FLAG_BLOCK_CHECKSUMS", Int(SegmentLayout.Flags.blockChecksums)),
                c("SLOT_SEQUENCE", S.sequence), c("SLOT_LENGTH", S.length), c("SLOT_CRC64", S.crc64),
                c("SLOT_PUBLISHED_AT", S.publishedAt), c("SLOT_DATA", S.data),
                c("BOARD_SIZE", SegmentLayout.WaitBoard.size, hex: false), c("BOARD_SLEEPERS", SegmentLayout.WaitBoard.sleepers),
            ]),
            ("Publish ring (docs/LAYOUT.md, \"Publish rings\")", [
                Constant(name: "RING_MAGIC", value: PublishRingLayout.magic),
                c("RING_LAYOUT_VERSION", Int(PublishRingLayout.layoutVersion), hex: false),
                c("RING_HEADER_SIZE", PublishRingLayout.headerSize, hex: false),
                c("RING_ENTRY_HEADER_SIZE", PublishRingLayout.entryHeaderSize, hex: false),
                c("RING_ALIGNMENT", PublishRingLayout.alignment, hex: false),
                Constant(name: "RING_WRAP_MARKER", value: UInt64(PublishRingLayout.wrapMarker)),
                c("RING_MAGIC_OFFSET", R.magic), c("RING_LAYOUT_VERSION_OFFSET", R.layoutVersion), c("RING_DATA_SIZE", R.dataSize),
                c("RING_HEAD", R.head), c("RING_PRODUCER_WAITING", R.producerWaiting), c("RING_TAIL", R.tail),
                c("RING_TAIL_FUTEX", R.tailFutex), c("RING_CONSUMER_IDLE", R.consumerIdle),
                c("RING_CONSUMED_ENTRIES", R.consumedEntries), c("RING_LAST_VERSION", R.lastVersion),
                c("RING_LAST_CRC64", R.lastCRC64), c("RING_LAST_LENGTH", R.lastLength), c("RING_LAST_PUBLISHED_AT", R.lastPublishedAt),
                c("RING_REFUSED_ENTRIES", R.refusedEntries), c("RING_LAST_REFUSAL_CODE", R.lastRefusalCode),
                c("RING_DETACHED_CODE", R.detachedCode), c("RING_SEGMENT_CAPACITY", R.segmentCapacity),
            ]),
            ("Frames and message types (docs/PROTOCOL.md, \"Frames\" and \"Message types\")", [
                c("PROTOCOL_VERSION", Int(ControlProtocol.version), hex: false),
                c("FRAME_HEADER_SIZE", ControlProtocol.headerSize, hex: false),
                c("MAX_FRAME", ControlProtocol.maximumFrameSize, hex: false),
            ] + MessageType.allCases.map { c("MSG_" + documentedName($0), Int($0.rawValue)) }),
            ("Error codes (docs/PROTOCOL.md, \"Error codes\")",
             ErrorCode.allCases.map { c("ERR_" + $0.name.uppercased().replacingOccurrences(of: "-", with: "_"), Int($0.rawValue), hex: false) }),
        ]
    }

    /// A message type's name as docs/PROTOCOL.md writes it: `ATTACH_RING`, `HELLO_OK`, `VERSION`.
    static func documentedName(_ type: MessageType) -> String {
        switch type {
        case .versionEvent: return "VERSION"
        case .retiredEvent: return "RETIRED"
        case .stalenessEvent: return "STALENESS"
        case .helloOK: return "HELLO_OK"
        case .ok: return "OK"
        default:
            return "\(type)".reduce(into: "") { name, character in
                if character.isUppercase, !name.isEmpty { name.append("_") }
                name.append(character.uppercased())
            }
        }
    }

    static func literal(_ constant: Constant) -> String {
        constant.hex ? "0x" + String(constant.value, radix: 16, uppercase: true) : "\(constant.value)"
    }

    static var cHeader: String {
        var text = """
        /* Generated from SegmentLayout, PublishRingLayout, MessageType and ErrorCode by
         * Tests/ShmBrokerProtocolTests/WireConformanceTests.swift (SHMBROKER_REGENERATE=1 swift test
         * --filter WireConformanceTests). Do not edit: the test fails when this file and the Swift
         * definitions disagree. */
        #ifndef SHMBROKER_WIRE_H
        #define SHMBROKER_WIRE_H

        """
        for section in sections {
            text += "\n/* \(section.title) */\n"
            for constant in section.constants {
                text += "#define WIRE_\(constant.name) \(literal(constant))\(constant.value > UInt64(UInt32.max) ? "ull" : "")\n"
            }
        }
        return text + "\n#endif\n"
    }

    static var pythonModule: String {
        var text = """
        \"\"\"Generated from SegmentLayout, PublishRingLayout, MessageType and ErrorCode by
        Tests/ShmBrokerProtocolTests/WireConformanceTests.swift (SHMBROKER_REGENERATE=1 swift test
        --filter WireConformanceTests). Do not edit: the test fails when this file and the Swift
        definitions disagree.\"\"\"

        """
        for section in sections {
            text += "\n# \(section.title)\n"
            for constant in section.constants { text += "\(constant.name) = \(literal(constant))\n" }
        }
        return text
    }

    func check(_ relativePath: String, equals expected: String) throws {
        let url = Self.root.appendingPathComponent(relativePath)
        if ProcessInfo.processInfo.environment["SHMBROKER_REGENERATE"] == "1" {
            try expected.write(to: url, atomically: true, encoding: .utf8)
        }
        let actual = try String(contentsOf: url, encoding: .utf8)
        XCTAssertEqual(actual, expected, "\(relativePath) disagrees with the Swift definitions; regenerate it (SHMBROKER_REGENERATE=1)")
    }

    func testTheGeneratedCHeaderAndPythonModuleMatchTheSwiftDefinitions() throws {
        try check("Sources/libshmbroker/shmbroker_wire.h", equals: Self.cHeader)
        try check("Sources/python/shmbroker/_wire.py", equals: Self.pythonModule)
    }

    func testThePublicCHeaderGivesTheSameErrorCodesAndVersions() throws {
        let header = try String(contentsOf: Self.root.appendingPathComponent("Sources/libshmbroker/include/shmbroker.h"), encoding: .utf8)
        for code in ErrorCode.allCases {
            let name = "SHMB_" + code.name.uppercased().replacingOccurrences(of: "-", with: "_")
            XCTAssertTrue(header.contains("\(name) = \(code.rawValue)"), "shmbroker.h: \(name) = \(code.rawValue)")
        }
        XCTAssertTrue(header.contains("#define SHMB_PROTOCOL_VERSION \(ControlProtocol.version)\n"))
        XCTAssertTrue(header.contains("#define SHMB_LAYOUT_VERSION \(SegmentLayout.layoutVersion)\n"))
    }

    func testTheDocumentedTablesGiveTheSameOffsetsAndCodes() throws {
        let layout = try String(contentsOf: Self.root.appendingPathComponent("docs/LAYOUT.md"), encoding: .utf8)
        let protocolText = try String(contentsOf: Self.root.appendingPathComponent("docs/PROTOCOL.md"), encoding: .utf8)
        typealias H = SegmentLayout.Header
        let header: [(Int, String)] = [(H.magic, "magic"), (H.layoutVersion, "layoutVersion"), (H.headerSize, "headerSize"),
                                       (H.capacity, "capacity"), (H.slotCount, "slotCount"), (H.flags, "flags"),
                                       (H.slotStride, "slotStride"), (H.createdAt, "createdAt"), (H.name, "name"),
                                       (H.latestVersion, "latestVersion"), (H.futexWord, "futexWord")]
        typealias S = SegmentLayout.Slot
        let slot: [(Int, String)] = [(S.sequence, "sequence"), (S.length, "length"), (S.crc64, "crc64"), (S.publishedAt, "publishedAt"),
                                     (S.data, "data")]
        let lines = layout.split(separator: "\n").map(String.init)
        for (offset, field) in header + slot {
            XCTAssertTrue(lines.contains { $0.hasPrefix(String(format: "| 0x%02X |", offset)) && $0.contains("`\(field)`") },
                          "docs/LAYOUT.md has no row for \(field) at 0x\(String(offset, radix: 16))")
        }
        XCTAssertTrue(layout.contains("# Segment memory layout (layout version \(SegmentLayout.layoutVersion))"))
        for type in MessageType.allCases {
            let expected = String(format: "| `0x%04X` | %@ |", type.rawValue, Self.documentedName(type))
            XCTAssertTrue(protocolText.contains(expected), "docs/PROTOCOL.md: \(expected)")
        }
        for code in ErrorCode.allCases {
            XCTAssertTrue(protocolText.contains("| \(code.rawValue) | `\(code.name)` |"), "docs/PROTOCOL.md: error \(code.rawValue) \(code.name)")
        }
    }
}
