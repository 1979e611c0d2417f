import CShmBrokerCRC
import Glibc

/// CRC-64/XZ (also called CRC-64/GO-ECMA): the ECMA-182 polynomial, reflected, initial value and
/// final XOR all ones. Check value: `CRC64.checksum("123456789") == 0x995DC9BBDF1939FA`.
///
/// This is the checksum stored with every published version, so a reader in any language can
/// verify content with a standard library routine (for example liblzma's `lzma_crc64`).
///
/// The widest implementation the CPU has is chosen once, at run time (``Path``): 512-bit
/// VPCLMULQDQ folding, 256-bit VPCLMULQDQ, 128-bit PCLMULQDQ (VEX-encoded where the CPU has AVX),
/// or a portable slicing-by-8 table.
/// All give identical results (the tests compare each against the bit-at-a-time definition).
/// `SHMBROKER_CRC64_PATH` (`portable`, `clmul128`, `clmul128avx`, `vpclmul256`, `vpclmul512`) caps the choice,
/// for measuring one path against another.
public struct CRC64: Sendable {
    /// One implementation of the checksum.
    public enum Path: Int32, Sendable, CaseIterable, CustomStringConvertible, Comparable {
        /// Slicing-by-8 tables, on any CPU.
        case portable = 0
        /// PCLMULQDQ + SSE4.1, 128 bits per fold.
        case clmul128 = 1
        /// The same folds in AVX's three-operand encoding (fewer register copies; CPUs with AVX
        /// but without VPCLMULQDQ, such as Cascade Lake, use it).
        case clmul128avx = 2
        /// VPCLMULQDQ + AVX2, 256 bits per fold.
        case vpclmul256 = 3
        /// VPCLMULQDQ + AVX-512F, 512 bits per fold.
        case vpclmul512 = 4

        public var description: String {
            switch self {
            case .portable: return "portable"
            case .clmul128: return "clmul128"
            case .clmul128avx: return "clmul128avx"
            case .vpclmul256: return "vpclmul256"
            case .vpclmul512: return "vpclmul512"
            }
        }

        /// Whether this CPU can run the path.
        public var isSupported: Bool { shmb_crc64_path_supported(rawValue) != 0 }

        public static func < (a: Path, b: Path) -> Bool { a.rawValue < b.rawValue }
    }

    /// Every path this CPU can run, narrowest first.
    public static var supportedPaths: [Path] { Path.allCases.filter(\.isSupported) }

    /// The path in use: the widest the CPU supports, capped by `SHMBROKER_CRC64_PATH`.
    public static let activePath: Path = {
        let best = Path(rawValue: shmb_crc64_best_path()) ?? .portable
        guard let requested = getenv("SHMBROKER_CRC64_PATH").map({ String(cString: $0) }),
              let cap = Path.allCases.first(where: { $0.description == requested }) else { return best }
        return min(cap, best)
    }()

    /// Whether a carry-less-multiply implementation is in use on this CPU.
    public static let isHardwareAccelerated = activePath >= .clmul128

    /// Below this many bytes (one 128-bit block) the table does all the work anyway.
    static let foldingThreshold = 16

    /// The reflected ECMA-182 polynomial.
    public static let reflectedPolynomial: UInt64 = 0xC96C_5795_D787_0F42

    /// Eight 256-entry tables for slicing-by-8: table k maps a byte to its CRC after k more zero bytes.
    @usableFromInline
    static let tables: [[UInt64]] = {
        var tables = [[UInt64]](repeating: [UInt64](repeating: 0, count: 256), count: 8)
        for byte in 0..<256 {
            var crc = UInt64(byte)
            for _ in 0..<8 {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ reflectedPolynomial : crc >> 1
            }
            tables[0][byte] = crc
        }
        for byte in 0..<256 {
            var crc = tables[0][byte]
            for k in 1..<8 {
                crc = tables[0][Int(crc & 0xFF)] ^ (crc >> 8)
                tables[k][byte] = crc
            }
        }
        return tables
    }()

    /// The running, non-finalised state (already XORed with the initial value).
    @usableFromInline
    var state: UInt64 = ~0

    public init() {}

    /// Feeds `bytes` into the checksum.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        update(bytes, path: CRC64.activePath)
    }

    /// Feeds `bytes` through a chosen implementation (the widest supported one below it, if the
    /// CPU lacks it): for tests and benchmarks that compare paths.
    public mutating func update(_ bytes: UnsafeRawBufferPointer, path: Path) {
        if path >= .clmul128 && bytes.count >= CRC64.foldingThreshold && CRC64.isHardwareAvailable {
            state = shmb_crc64_update_path(path.rawValue, state, bytes.baseAddress, bytes.count)
        } else {
            updatePortably(bytes)
        }
    }

    /// Whether the CPU has PCLMULQDQ at all (whatever `SHMBROKER_CRC64_PATH` says).
    static let isHardwareAvailable = shmb_crc64_hardware_available() != 0

    /// Feeds `bytes` through the portable table implementation, whatever the CPU.
    public mutating func updatePortably(_ bytes: UnsafeRawBufferPointer) {
        state = CRC64.tables.withUnsafeBufferPointer { tables in
            CRC64.slicingBy8(state: state, bytes: bytes, tables: tables)
        }
    }

    /// Copies `source` to `destination` and returns the CRC-64/XZ of the bytes, in one pass over
    /// memory where the CPU allows (a reader's verified copy-out).
    /// - Parameters:
    ///   - source: the bytes to copy and check.
    ///   - destination: at least `source.count` writable bytes, not overlapping `source`.
    ///   - path: the implementation (default: ``activePath``).
    public static func copyAndChecksum(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer,
                                       path: Path = activePath) -> UInt64 {
        guard let base = source.baseAddress else { return 0 }
        if path >= .clmul128 && source.count >= foldingThreshold && isHardwareAvailable {
            return ~shmb_crc64_copy_path(path.rawValue, ~0, destination, base, source.count)
        }
        destination.copyMemory(from: base, byteCount: source.count)
        var crc = CRC64()
        crc.updatePortably(UnsafeRawBufferPointer(start: destination, count: source.count))
        return crc.value
    }

    /// Copies `source` to `destination`, then checksums the copy: two passes, where
    /// ``copyAndChecksum(from:to:)`` makes one. Faster for the daemon's publishes of mid-sized
    /// payloads (8 KiB to 256 KiB), whose source another core just wrote: a plain copy streams it
    /// over best, and the second pass then reads the copy from this core's own cache. Slower
    /// where the copy does not stay in cache, and for a reader's copy-out (measured with
    /// `shmbroker-bench`), so only ``SegmentWriter`` uses it, and only for those sizes.
    public static func copyThenChecksum(from source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) -> UInt64 {
        guard let base = source.baseAddress else { return 0 }
        destination.copyMemory(from: base, byteCount: source.count)
        return checksum(UnsafeRawBufferPointer(start: destination, count: source.count))
    }

    /// The payload sizes for which ``copyThenChecksum(from:to:)`` beats one fused pass when the
    /// source was written by another core.
    public static let twoPassPublishSizes = 8192...(256 << 10)

    /// The checksum of everything fed so far.
    public var value: UInt64 { ~state }

    /// The CRC-64/XZ of `bytes`.
    /// - Parameters:
    ///   - bytes: the input.
    ///   - path: the implementation (default: ``activePath``).
    public static func checksum(_ bytes: UnsafeRawBufferPointer, path: Path = activePath) -> UInt64 {
        var crc = CRC64()
        crc.update(bytes, path: path)
        return crc.value
    }

    /// The CRC-64/XZ of a byte collection.
    public static func checksum<C: Collection>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
        if let result = bytes.withContiguousStorageIfAvailable({ checksum(UnsafeRawBufferPointer($0)) }) {
            return result
        }
        return Array(bytes).withUnsafeBytes { checksum($0) }
    }

    /// The bit-at-a-time definition, kept as the reference that faster versions are tested against.
    public static func referenceChecksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var crc: UInt64 = ~0
        for byte in bytes {
            crc ^= UInt64(byte)
            for _ in 0..<8 {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ reflectedPolynomial : crc >> 1
            }
        }
        return ~crc
    }

    @inline(__always)
    static func slicingBy8(state: UInt64, bytes: UnsafeRawBufferPointer, tables: UnsafeBufferPointer<[UInt64]>) -> UInt64 {
        var crc = state
        var index = 0
        let count = bytes.count
        guard let base = bytes.baseAddress else { return crc }
        tables[0].withUnsafeBufferPointer { t0 in
        tables[1].withUnsafeBufferPointer { t1 in
        tables[2].withUnsafeBufferPointer { t2 in
        tables[3].withUnsafeBufferPointer { t3 in
        tables[4].withUnsafeBufferPointer { t4 in
        tables[5].withUnsafeBufferPointer { t5 in
        tables[6].withUnsafeBufferPointer { t6 in
        tables[7].withUnsafeBufferPointer { t7 in
            while index + 8 <= count {
                let word = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: index, as: UInt64.self)) ^ crc
                crc = t7[Int(word & 0xFF)] ^ t6[Int((word >> 8) & 0xFF)]
                    ^ t5[Int((word >> 16) & 0xFF)] ^ t4[Int((word >> 24) & 0xFF)]
                    ^ t3[Int((word >> 32) & 0xFF)] ^ t2[Int((word >> 40) & 0xFF)]
                    ^ t1[Int((word >> 48) & 0xFF)] ^ t0[Int(word >> 56)]
                index += 8
            }
            while index < count {
                crc = t0[Int((crc ^ UInt64(base.load(fromByteOffset: index, as: UInt8.self))) & 0xFF)] ^ (crc >> 8)
                index += 1
            }
        }}}}}}}}
        return crc
    }
}
