import Atomics
import ShmBrokerPlatform
import ShmBrokerProtocol

/// The byte layout of a publish ring, as specified in `docs/LAYOUT.md` ("Publish rings").
///
/// A publish ring is a memfd that a producer creates and attaches to one segment: the producer
/// appends payloads to it and the daemon copies them into the segment, so a stream of publishes
/// costs no request, reply or descriptor per version. The producer owns the file and writes
/// `head` and the entries; the daemon writes `tail` and the results. Each side treats what the
/// other wrote as untrusted input.
public enum PublishRingLayout {
    /// `"SHMBRING"` as bytes, read as a little-endian `UInt64`.
    public static let magic: UInt64 = 0x474E_4952_424D_4853
    /// Bumped on any incompatible change to this layout.
    public static let layoutVersion: UInt32 = 1
    /// The header page; the data area starts here.
    public static let headerSize = 4096
    /// Bytes before each entry's payload.
    public static let entryHeaderSize = 16
    /// Entries start on cache-line boundaries.
    public static let alignment = 64
    /// An entry length meaning "the rest of the data area is unused; continue at its start".
    public static let wrapMarker: UInt32 = 0xFFFF_FFFF

    /// Header field offsets. Fields written by different sides sit on different cache lines.
    public enum Header {
        public static let magic = 0x00
        public static let layoutVersion = 0x08
        public static let dataSize = 0x10
        /// Producer-owned: bytes of the entry stream ever written (monotonic).
        public static let head = 0x40
        /// Producer-owned: non-zero while the producer sleeps on `tailFutex` for space.
        public static let producerWaiting = 0x48
        /// Daemon-owned: bytes of the entry stream ever consumed (monotonic).
        public static let tail = 0x80
        /// Daemon-owned: incremented after every advance of `tail` and on detaching.
        public static let tailFutex = 0x88
        /// Daemon-owned: 1 when the daemon found the ring empty and wants a signal on the
        /// eventfd for the next entry; 0 while it is consuming anyway.
        public static let consumerIdle = 0x8C
        /// Daemon-owned results, updated after each entry.
        public static let consumedEntries = 0xC0
        public static let lastVersion = 0xC8
        public static let lastCRC64 = 0xD0
        public static let lastLength = 0xD8
        public static let lastPublishedAt = 0xE0
        public static let refusedEntries = 0xE8
        public static let lastRefusalCode = 0xF0
        /// Daemon-owned: non-zero once the daemon stopped consuming; the value is an error code.
        public static let detachedCode = 0xF4
        /// Daemon-owned: the segment's current capacity (it can change on a reload).
        public static let segmentCapacity = 0xF8
    }

    /// The bytes an entry of `payloadLength` bytes occupies, header and padding included.
    public static func entrySize(payloadLength: Int) -> Int {
        (entryHeaderSize + payloadLength + alignment - 1) / alignment * alignment
    }

    /// A data-area size that holds two entries of `capacity` bytes (so the producer can write
    /// one while the daemon copies the other), at least `minimum`, in whole pages. (1 MiB: with
    /// 64 KiB payloads the producer can run a dozen entries ahead, which measured better on
    /// two cores than 256 KiB or 4 MiB.)
    public static func dataSize(forCapacity capacity: Int, minimum: Int = 1 << 20) -> Int {
        let wanted = max(minimum, 2 * entrySize(payloadLength: capacity))
        return (wanted + 4095) / 4096 * 4096
    }
}

/// Typed access to a mapped ring's header fields.
struct RingMemory: @unchecked Sendable {
    let region: MappedRegion
    let dataSize: Int

    var base: UnsafeMutableRawPointer { region.base }
    var data: UnsafeMutableRawPointer { region.base + PublishRingLayout.headerSize }

    func atomic64(_ offset: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (base + offset).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
    }

    func atomic32(_ offset: Int) -> UnsafeAtomic<UInt32> {
        UnsafeAtomic(at: (base + offset).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }

    func word(_ offset: Int) -> UnsafePointer<UInt32> {
        UnsafePointer((base + offset).assumingMemoryBound(to: UInt32.self))
    }

    var head: UnsafeAtomic<UInt64> { atomic64(PublishRingLayout.Header.head) }
    var tail: UnsafeAtomic<UInt64> { atomic64(PublishRingLayout.Header.tail) }
    var tailFutex: UnsafeAtomic<UInt32> { atomic32(PublishRingLayout.Header.tailFutex) }
    var producerWaiting: UnsafeAtomic<UInt32> { atomic32(PublishRingLayout.Header.producerWaiting) }
    var consumerIdle: UnsafeAtomic<UInt32> { atomic32(PublishRingLayout.Header.consumerIdle) }
    var detachedCode: UnsafeAtomic<UInt32> { atomic32(PublishRingLayout.Header.detachedCode) }

    func load<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    func store<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }

    /// Records why the ring is no longer consumed and wakes the producer.
    func detach(code: UInt32) {
        detachedCode.store(max(code, 1), ordering: .sequentiallyConsistent)
        wakeProducer()
    }

    /// Wakes a producer sleeping for space (cheap when none is).
    func wakeProducer() {
        tailFutex.wrappingIncrement(ordering: .sequentiallyConsistent)
        if producerWaiting.load(ordering: .sequentiallyConsistent) != 0 {
            Futex.wakeAll(word(PublishRingLayout.Header.tailFutex))
        }
    }
}

/// Why a ring could not be used.
public enum PublishRingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The mapping is not a ring this build understands.
    case invalidRing(String)
    /// The payload can never fit: the ring's data area is too small for it.
    case payloadTooLarge(length: Int, maximum: Int)
    /// No space freed up before the timeout (the daemon is not consuming).
    case timedOut
    /// The daemon stopped consuming this ring, with this protocol error code.
    case detached(code: UInt32)

    public var description: String {
        switch self {
        case .invalidRing(let reason): return "not a usable publish ring: \(reason)"
        case let .payloadTooLarge(length, maximum):
            return "payload of \(length) bytes exceeds the \(maximum) bytes this ring can hold in one entry"
        case .timedOut: return "the ring stayed full until the timeout: the daemon is not consuming it"
        case .detached(let code): return "the daemon detached the ring (error code \(code))"
        }
    }
}

/// What the daemon reported in the ring after consuming entries.
public struct PublishRingResults: Sendable, Equatable {
    /// Entries consumed so far (published or refused).
    public var consumedEntries: UInt64
    /// The version the most recent published entry became (0 before the first).
    public var lastVersion: UInt64
    public var lastCRC64: UInt64
    public var lastLength: UInt64
    public var lastPublishedAtNanoseconds: UInt64
    /// Entries the daemon refused (for example longer than the segment's capacity).
    public var refusedEntries: UInt64
    /// The protocol error code of the most recent refusal (0 if none).
    public var lastRefusalCode: UInt32
    /// Non-zero once the daemon stopped consuming the ring: the protocol error code saying why.
    public var detachedCode: UInt32
}

/// The producer's end of a publish ring: appends entries and reads the daemon's results.
///
/// Not thread-safe: one thread appends at a time (``ShmBrokerClient``'s publisher serializes).
public final class PublishRingProducer: @unchecked Sendable {
    let memory: RingMemory
    /// Entries appended so far.
    public private(set) var appendedEntries: UInt64 = 0

    /// Formats a fresh ring in `region` (zeroed, as a new memfd is) with a data area of
    /// `dataSize` bytes, a multiple of 4096 that fits the mapping after the header page.
    public init(formatting region: MappedRegion, dataSize: Int) {
        precondition(dataSize > 0 && dataSize % 4096 == 0 && region.length >= PublishRingLayout.headerSize + dataSize)
        memory = RingMemory(region: region, dataSize: dataSize)
        memory.store(PublishRingLayout.magic, at: PublishRingLayout.Header.magic)
        memory.store(PublishRingLayout.layoutVersion, at: PublishRingLayout.Header.layoutVersion)
        memory.store(UInt64(dataSize), at: PublishRingLayout.Header.dataSize)
        // Until a daemon says otherwise, every append signals: a ring attached to a daemon that
        // has not looked at it yet must not wait for nothing.
        memory.consumerIdle.store(1, ordering: .sequentiallyConsistent)
    }

    /// The segment's capacity as the daemon last recorded it (0 before it attached the ring).
    public var segmentCapacity: Int {
        Int(clamping: memory.load(UInt64.self, at: PublishRingLayout.Header.segmentCapacity))
    }

    /// The largest payload one entry can carry: half the data area less the entry header, so that
    /// an entry that must wrap (skipping the end of the area) always fits once the ring drains.
    public var maximumPayload: Int { memory.dataSize / 2 - PublishRingLayout.entryHeaderSize }

    /// Appends one payload, waiting (on the ring's futex) while the ring is full.
    ///
    /// - Parameters:
    ///   - bytes: the payload.
    ///   - timeoutNanoseconds: the longest wait for space; nil waits indefinitely.
    /// - Returns: true if the daemon asked to be signalled (write to the ring's eventfd).
    /// - Throws: ``PublishRingError`` if it can never fit, space never came, or the ring was detached.
    public func append(_ bytes: UnsafeRawBufferPointer, timeoutNanoseconds: UInt64?) throws(PublishRingError) -> Bool {
        let dataSize = memory.dataSize
        let entrySize = PublishRingLayout.entrySize(payloadLength: bytes.count)
        guard bytes.count <= maximumPayload else {
            throw .payloadTooLarge(length: bytes.count, maximum: maximumPayload)
        }
        var head = memory.head.load(ordering: .relaxed)
        let offset = Int(head % UInt64(dataSize))
        let skip = dataSize - offset < entrySize ? dataSize - offset : 0
        try waitForSpace(UInt64(skip + entrySize), head: head, timeoutNanoseconds: timeoutNanoseconds)
        if skip > 0 {
            memory.data.storeBytes(of: PublishRingLayout.wrapMarker.littleEndian, toByteOffset: offset, as: UInt32.self)
            head += UInt64(skip)
        }
        let entry = memory.data + Int(head % UInt64(dataSize))
        entry.storeBytes(of: UInt32(bytes.count).littleEndian, as: UInt32.self)
        entry.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        entry.storeBytes(of: (appendedEntries + 1).littleEndian, toByteOffset: 8, as: UInt64.self)
        if let source = bytes.baseAddress {
            (entry + PublishRingLayout.entryHeaderSize).copyMemory(from: source, byteCount: bytes.count)
        }
        appendedEntries += 1
        // Publish the entry, then look whether the daemon sleeps: sequentially consistent on
        // both sides, so either it sees the new head or this sees its idle flag.
        memory.head.store(head + UInt64(entrySize), ordering: .sequentiallyConsistent)
        return memory.consumerIdle.load(ordering: .sequentiallyConsistent) != 0
    }

    private func waitForSpace(_ needed: UInt64, head: UInt64, timeoutNanoseconds: UInt64?) throws(PublishRingError) {
        let deadline = timeoutNanoseconds.map { Clock.monotonicNanoseconds() &+ $0 }
        while true {
            if let code = detachedCode { throw .detached(code: code) }
            let tail = memory.tail.load(ordering: .acquiring)
            if UInt64(memory.dataSize) - (head &- tail) >= needed { return }
            try sleepOnTail(until: deadline)
        }
    }

    /// Waits until the daemon consumed every appended entry.
    /// - Returns: the daemon's results once it did.
    /// - Throws: ``PublishRingError/timedOut`` or ``PublishRingError/detached(code:)``.
    public func waitUntilConsumed(timeoutNanoseconds: UInt64?) throws(PublishRingError) -> PublishRingResults {
        let deadline = timeoutNanoseconds.map { Clock.monotonicNanoseconds() &+ $0 }
        let head = memory.head.load(ordering: .relaxed)
        while memory.tail.load(ordering: .acquiring) != head {
            if let code = detachedCode { throw .detached(code: code) }
            try sleepOnTail(until: deadline)
        }
        return results
    }

    private func sleepOnTail(until deadline: UInt64?) throws(PublishRingError) {
        let word = memory.tailFutex.load(ordering: .sequentiallyConsistent)
        memory.producerWaiting.store(1, ordering: .sequentiallyConsistent)
        defer { memory.producerWaiting.store(0, ordering: .relaxed) }
        // Re-check after announcing the wait: the daemon wakes only waiters it can see.
        var remaining: UInt64?
        if let deadline {
            let now = Clock.monotonicNanoseconds()
            guard now < deadline else { throw .timedOut }
            remaining = deadline - now
        }
        if memory.tailFutex.load(ordering: .sequentiallyConsistent) == word && detachedCode == nil {
            _ = Futex.wait(on: memory.word(PublishRingLayout.Header.tailFutex), whileEqualTo: word, timeoutNanoseconds: remaining)
        }
    }

    /// Marks the ring detached from this side (the connection to the daemon was lost), waking a
    /// thread of this process sleeping in ``append(_:timeoutNanoseconds:)`` or
    /// ``waitUntilConsumed(timeoutNanoseconds:)`` so that it fails with `code`.
    public func detachLocally(code: UInt32) {
        memory.detach(code: code)
    }

    /// The daemon's latest results.
    public var results: PublishRingResults {
        let h = PublishRingLayout.Header.self
        return PublishRingResults(
            consumedEntries: memory.load(UInt64.self, at: h.consumedEntries), lastVersion: memory.load(UInt64.self, at: h.lastVersion),
            lastCRC64: memory.load(UInt64.self, at: h.lastCRC64), lastLength: memory.load(UInt64.self, at: h.lastLength),
            lastPublishedAtNanoseconds: memory.load(UInt64.self, at: h.lastPublishedAt),
            refusedEntries: memory.load(UInt64.self, at: h.refusedEntries),
            lastRefusalCode: memory.load(UInt32.self, at: h.lastRefusalCode),
            detachedCode: memory.detachedCode.load(ordering: .acquiring))
    }

    var detachedCode: UInt32? {
        let code = memory.detachedCode.load(ordering: .acquiring)
        return code == 0 ? nil : code
    }

    /// Clears a detachment, for attaching the same ring to a new daemon after a restart. The new
    /// daemon continues at `tail`: entries the old one had not consumed are not lost.
    public func prepareForReattaching() {
        memory.detachedCode.store(0, ordering: .sequentiallyConsistent)
        memory.consumerIdle.store(1, ordering: .sequentiallyConsistent)
    }
}

/// The daemon's end of a publish ring: validates and consumes what a producer appended.
///
/// Everything in the ring is the producer's to change at any moment, so every field is read once
/// and checked before use; a ring that breaks the rules is reported as broken and detached, never
/// followed out of bounds.
public final class PublishRingConsumer {
    let memory: RingMemory

    /// What one call to ``drain(maximumEntries:publish:)`` ended with.
    public enum DrainOutcome: Sendable, Equatable {
        /// The ring is empty and its idle flag is set: the producer will signal the next entry.
        case idle
        /// The entry budget ran out with entries left.
        case more
        /// The producer broke the ring's rules; stop consuming it.
        case broken(String)
    }

    /// Checks a producer's mapped ring.
    /// - Throws: ``PublishRingError/invalidRing(_:)`` naming what is wrong.
    public init(region: MappedRegion) throws(PublishRingError) {
        guard region.length > PublishRingLayout.headerSize else {
            throw .invalidRing("the file holds \(region.length) bytes, less than the \(PublishRingLayout.headerSize)-byte header and any data")
        }
        func field<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T {
            T(littleEndian: region.base.loadUnaligned(fromByteOffset: offset, as: T.self))
        }
        let magic = field(UInt64.self, PublishRingLayout.Header.magic)
        guard magic == PublishRingLayout.magic else {
            throw .invalidRing("magic is 0x\(String(magic, radix: 16)), expected 0x\(String(PublishRingLayout.magic, radix: 16)) (\"SHMBRING\")")
        }
        let version = field(UInt32.self, PublishRingLayout.Header.layoutVersion)
        guard version == PublishRingLayout.layoutVersion else {
            throw .invalidRing("ring layout version \(version), this daemon reads version \(PublishRingLayout.layoutVersion)")
        }
        let dataSize = field(UInt64.self, PublishRingLayout.Header.dataSize)
        guard dataSize > 0, dataSize % 4096 == 0, dataSize <= UInt64(region.length - PublishRingLayout.headerSize) else {
            throw .invalidRing("data size \(dataSize) must be a positive multiple of 4096 within the file's \(region.length) bytes")
        }
        memory = RingMemory(region: region, dataSize: Int(dataSize))
        let tail = memory.tail.load(ordering: .acquiring)
        guard tail % UInt64(PublishRingLayout.alignment) == 0 else {
            throw .invalidRing("tail \(tail) is not a multiple of \(PublishRingLayout.alignment)")
        }
    }

    /// The most entries the ring can hold at once: a drain of this many empties it, unless the
    /// producer keeps appending.
    public var capacityInEntries: Int { memory.dataSize / PublishRingLayout.alignment }

    /// Records the segment's capacity for the producer (at attaching, and after a reload resized it).
    public func recordSegmentCapacity(_ capacity: Int) {
        let field = PublishRingLayout.Header.segmentCapacity
        if memory.load(UInt64.self, at: field) != UInt64(capacity) { memory.store(UInt64(capacity), at: field) }
    }

    /// The daemon is about to consume: producers need not signal until it reports idle again.
    public func markAwake() {
        // Only when set: a daemon polling the ring calls this on every turn, and a store would
        // take the line from the producer each time.
        if memory.consumerIdle.load(ordering: .relaxed) != 0 {
            memory.consumerIdle.store(0, ordering: .sequentiallyConsistent)
        }
    }

    /// Consumes up to `maximumEntries` entries, handing each payload to `publish`.
    ///
    /// - Parameters:
    ///   - maximumEntries: the most entries consumed before returning ``DrainOutcome/more``.
    ///   - staysAwake: when the ring is empty, leave the idle flag clear (a daemon that keeps
    ///     polling: producers then append without ringing the doorbell). The last drain before
    ///     the poller sleeps must not stay awake, or the next entry would go unnoticed.
    ///   - publish: publishes one payload (the bytes stay the producer's to change: copy
    ///   them once, checksumming the copy) and returns its receipt, or the error code of a refusal.
    public func drain(maximumEntries: Int, staysAwake: Bool = false,
                      publish: (UnsafeRawBufferPointer) -> Result<PublishReceipt, RingRefusal>) -> DrainOutcome {
        let dataSize = UInt64(memory.dataSize)
        var tail = memory.tail.load(ordering: .relaxed)
        var consumed = 0
        while consumed < maximumEntries {
            var head = memory.head.load(ordering: .acquiring)
            if head == tail && staysAwake { return .idle }
            if head == tail {
                // Empty: ask for a signal, then look once more (the producer may have appended
                // before it could see the flag).
                memory.consumerIdle.store(1, ordering: .sequentiallyConsistent)
                head = memory.head.load(ordering: .sequentiallyConsistent)
                if head == tail { return .idle }
                memory.consumerIdle.store(0, ordering: .sequentiallyConsistent)
            }
            guard head > tail, head - tail <= dataSize else {
                return .broken("head \(head) is not within one ring (\(dataSize) bytes) ahead of tail \(tail)")
            }
            let offset = Int(tail % dataSize)
            let entry = memory.data + offset
            let length = UInt32(littleEndian: entry.loadUnaligned(as: UInt32.self))
            if length == PublishRingLayout.wrapMarker {
                guard offset != 0 else { return .broken("a wrap marker at the start of the data area") }
                tail += dataSize - UInt64(offset)
                guard tail <= head else { return .broken("a wrap marker past head \(head)") }
                advance(to: tail)
                continue
            }
            let size = PublishRingLayout.entrySize(payloadLength: Int(length))
            guard UInt64(length) < dataSize, offset + size <= Int(dataSize), tail + UInt64(size) <= head else {
                return .broken("an entry of \(length) bytes at offset \(offset) does not fit before head \(head) in a \(dataSize)-byte ring")
            }
            let payload = UnsafeRawBufferPointer(start: entry + PublishRingLayout.entryHeaderSize, count: Int(length))
            let h = PublishRingLayout.Header.self
            switch publish(payload) {
            case .success(let receipt):
                memory.store(receipt.version, at: h.lastVersion)
                memory.store(receipt.crc64, at: h.lastCRC64)
                memory.store(UInt64(receipt.length), at: h.lastLength)
                memory.store(receipt.publishedAtNanoseconds, at: h.lastPublishedAt)
            case .failure(let refusal):
                memory.store(memory.load(UInt64.self, at: h.refusedEntries) &+ 1, at: h.refusedEntries)
                memory.store(refusal.code, at: h.lastRefusalCode)
            }
            memory.store(memory.load(UInt64.self, at: h.consumedEntries) &+ 1, at: h.consumedEntries)
            tail += UInt64(size)
            advance(to: tail)
            consumed += 1
        }
        return .more
    }

    private func advance(to tail: UInt64) {
        memory.tail.store(tail, ordering: .releasing)
        memory.wakeProducer()
    }

    /// Stops consuming for good, telling the producer why (a protocol error code, non-zero).
    public func detach(code: UInt32) {
        memory.detach(code: code)
    }
}

/// Why the daemon refused one ring entry: a protocol error code, recorded in the ring.
public struct RingRefusal: Error, Sendable {
    public var code: UInt32
    public init(code: UInt32) { self.code = code }
}
