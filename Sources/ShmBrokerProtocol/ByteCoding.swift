/// Appends little-endian fields to a frame being encoded.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(reservingCapacity capacity: Int = 64) {
        bytes.reserveCapacity(capacity)
    }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// A string as a `u16` byte count followed by its UTF-8 bytes (truncated to 65535 bytes).
    public mutating func write(string: String) {
        let utf8 = Array(string.utf8.prefix(Int(UInt16.max)))
        write(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    /// Raw bytes with no length prefix (a frame's trailing payload).
    public mutating func write(raw: [UInt8]) {
        bytes.append(contentsOf: raw)
    }
}

/// Reads little-endian fields from a received frame body, failing precisely on short input.
public struct ByteReader {
    private let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    public var remaining: Int { bytes.count - offset }

    // Field names are autoclosures: they are only built into a message when decoding fails,
    // never on the hot path of a well-formed request.
    public mutating func read<T: FixedWidthInteger>(_ type: T.Type, _ field: @autoclosure () -> String) throws(ProtocolError) -> T {
        guard remaining >= MemoryLayout<T>.size else {
            throw .malformed("body ends before field '\(field())' (\(MemoryLayout<T>.size) bytes needed at offset \(offset), \(remaining) left)")
        }
        let value = T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
        offset += MemoryLayout<T>.size
        return value
    }

    /// A `u16`-prefixed UTF-8 string; invalid UTF-8 is an error, not replaced.
    public mutating func readString(_ field: @autoclosure () -> String) throws(ProtocolError) -> String {
        let count = Int(try read(UInt16.self, "\(field()) length"))
        guard remaining >= count else {
            throw .malformed("field '\(field())' claims \(count) bytes, only \(remaining) left")
        }
        let slice = UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + count])
        offset += count
        guard let string = String(validating: slice, as: UTF8.self) else {
            throw .malformed("field '\(field())' is not valid UTF-8")
        }
        return string
    }

    /// All bytes left in the body.
    public mutating func readRest() -> UnsafeRawBufferPointer {
        let rest = UnsafeRawBufferPointer(rebasing: bytes[offset...])
        offset = bytes.count
        return rest
    }

    /// Fails if anything is left: every message has a fixed shape.
    public func expectEnd(_ message: @autoclosure () -> String) throws(ProtocolError) {
        guard remaining == 0 else {
            throw .malformed("\(remaining) unexpected trailing bytes after \(message())")
        }
    }
}
