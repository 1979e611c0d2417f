/// Constants of the control protocol (see `docs/PROTOCOL.md`).
public enum ControlProtocol {
    /// The protocol version spoken by this build; HELLO negotiates it.
    public static let version: UInt32 = 1
    /// Every frame starts with this many header bytes.
    public static let headerSize = 12
    /// The largest frame either side may send; longer ones are refused with `frame-too-large`.
    public static let maximumFrameSize = 65_536
    /// Most descriptors a frame may carry (PUBLISH with a memfd carries one, ATTACH_RING two,
    /// others none).
    public static let maximumDescriptors = 2

    /// The largest inline PUBLISH payload for a segment name of `nameLength` UTF-8 bytes.
    public static func maximumInlinePayload(nameLength: Int) -> Int {
        maximumFrameSize - headerSize - 2 - nameLength - 1
    }
}

/// Message type codes: requests below 0x4000, events 0x4000–0x7FFF, replies from 0x8000.
public enum MessageType: UInt16, Sendable, CaseIterable {
    case hello = 0x0001
    case open = 0x0002
    case subscribe = 0x0003
    case unsubscribe = 0x0004
    case publish = 0x0005
    case status = 0x0006
    case attachRing = 0x0007
    case detachRing = 0x0008
    case metrics = 0x0009

    case versionEvent = 0x4001
    case retiredEvent = 0x4002
    case stalenessEvent = 0x4003

    case ok = 0x8000
    case helloOK = 0x8001
    case opened = 0x8002
    case subscribed = 0x8003
    case published = 0x8005
    case statusReport = 0x8006
    case statusReportFile = 0x8007
    case ringAttached = 0x8008
    case metricsReport = 0x8009
    case metricsReportFile = 0x800A
    case error = 0x80FF
}

/// A frame's fixed header.
public struct FrameHeader: Sendable, Equatable {
    public var type: UInt16
    public var flags: UInt16
    public var requestID: UInt32
    public var bodyLength: UInt32

    /// Parses and checks the header of a received frame of `frame.count` bytes.
    public static func parse(_ frame: UnsafeRawBufferPointer) throws(ProtocolError) -> FrameHeader {
        guard frame.count >= ControlProtocol.headerSize else {
            throw .malformed("frame of \(frame.count) bytes is shorter than the \(ControlProtocol.headerSize)-byte header")
        }
        var reader = ByteReader(frame)
        let header = FrameHeader(
            type: try reader.read(UInt16.self, "type"), flags: try reader.read(UInt16.self, "flags"),
            requestID: try reader.read(UInt32.self, "request id"), bodyLength: try reader.read(UInt32.self, "body length"))
        guard Int(header.bodyLength) == frame.count - ControlProtocol.headerSize else {
            throw .malformed("header says the body is \(header.bodyLength) bytes, the frame carries \(frame.count - ControlProtocol.headerSize)")
        }
        guard header.flags == 0 else { throw .malformed("flags must be 0, got \(header.flags)") }
        return header
    }
}

/// How a PUBLISH carries its payload.
public enum PublishPayload: Sendable, Equatable {
    /// The payload follows in the frame itself.
    case inline([UInt8])
    /// The payload is the first `length` bytes of a file (a memfd) attached to the frame.
    case attachedFile(length: UInt64)
}

/// A request from a client to the daemon.
public enum Request: Sendable, Equatable {
    case hello(protocolVersion: UInt32, clientName: String)
    case open(segment: String)
    case subscribe(segment: String)
    case unsubscribe(segment: String)
    case publish(segment: String, payload: PublishPayload)
    case status
    /// Attach a publish ring (memfd) and its doorbell (eventfd), in that order, to a segment.
    case attachRing(segment: String)
    case detachRing(segment: String)
    /// The owner's metrics in the Prometheus text format.
    case metrics

    /// How many descriptors must accompany the request (PROTOCOL.md, "Message types"): one with a
    /// PUBLISH of an attached file, two with ATTACH_RING, none with anything else.
    public var descriptorCount: Int {
        switch self {
        case .publish(_, .attachedFile): return 1
        case .attachRing: return 2
        default: return 0
        }
    }

    /// What the descriptors are, in order, for messages.
    public var descriptorRoles: String {
        switch self {
        case .publish(_, .attachedFile): return "a memfd holding the payload"
        case .attachRing: return "the ring memfd, then its eventfd"
        default: return "none"
        }
    }

    public var type: MessageType {
        switch self {
        case .metrics: return .metrics
        case .hello: return .hello
        case .open: return .open
        case .subscribe: return .subscribe
        case .unsubscribe: return .unsubscribe
        case .publish: return .publish
        case .status: return .status
        case .attachRing: return .attachRing
        case .detachRing: return .detachRing
        }
    }

    /// Encodes the request as one frame.
    public func encode(requestID: UInt32) -> [UInt8] {
        var body = Frame.begin(type: type, requestID: requestID, bodyCapacity: 64)
        switch self {
        case let .hello(version, name):
            body.write(version)
            body.write(string: name)
        case let .open(segment), let .subscribe(segment), let .unsubscribe(segment),
             let .attachRing(segment), let .detachRing(segment):
            body.write(string: segment)
        case let .publish(segment, payload):
            body.write(string: segment)
            switch payload {
            case .inline(let bytes):
                body.write(UInt8(0))
                body.write(raw: bytes)
            case .attachedFile(let length):
                body.write(UInt8(1))
                body.write(length)
            }
        case .status, .metrics:
            break
        }
        return Frame.finish(body)
    }

    /// Decodes a request body of the given type.
    /// - Throws: `unknown-message-type` for a type that is not a request, `malformed-frame` for a
    ///   body that does not have that request's shape.
    public static func decode(type: UInt16, body: UnsafeRawBufferPointer) throws(ProtocolError) -> Request {
        var reader = ByteReader(body)
        let request: Request
        switch MessageType(rawValue: type) {
        case .hello:
            request = .hello(protocolVersion: try reader.read(UInt32.self, "protocol version"),
                             clientName: try reader.readString("client name"))
        case .open:
            request = .open(segment: try reader.readString("segment"))
        case .subscribe:
            request = .subscribe(segment: try reader.readString("segment"))
        case .unsubscribe:
            request = .unsubscribe(segment: try reader.readString("segment"))
        case .publish:
            let segment = try reader.readString("segment")
            switch try reader.read(UInt8.self, "payload mode") {
            case 0:
                request = .publish(segment: segment, payload: .inline(Array(reader.readRest())))
            case 1:
                request = .publish(segment: segment, payload: .attachedFile(length: try reader.read(UInt64.self, "payload length")))
            case let mode:
                throw .malformed("payload mode must be 0 (inline) or 1 (attached file), got \(mode)")
            }
        case .status:
            request = .status
        case .metrics:
            request = .metrics
        case .attachRing:
            request = .attachRing(segment: try reader.readString("segment"))
        case .detachRing:
            request = .detachRing(segment: try reader.readString("segment"))
        default:
            throw ProtocolError(.unknownMessageType, "unknown request type 0x\(String(type, radix: 16))")
        }
        try reader.expectEnd("\(request.type)")
        return request
    }
}

/// Layout parameters sent with an opened segment's descriptor.
public struct OpenedSegment: Sendable, Equatable {
    public var capacity: UInt64
    public var slotCount: UInt32
    public var layoutVersion: UInt32
    public var mappingSize: UInt64
    public var latestVersion: UInt64

    public init(capacity: UInt64, slotCount: UInt32, layoutVersion: UInt32, mappingSize: UInt64, latestVersion: UInt64) {
        self.capacity = capacity
        self.slotCount = slotCount
        self.layoutVersion = layoutVersion
        self.mappingSize = mappingSize
        self.latestVersion = latestVersion
    }
}

/// What was recorded about a version: its number, length, CRC-64/XZ and publish time. The one
/// receipt type: a writer returns it (`SegmentWriter`, the embedded owner), PUBLISHED replies,
/// SUBSCRIBED replies and VERSION events carry it (32 bytes on the wire, `docs/PROTOCOL.md`), and
/// clients hand it on.
public struct PublishReceipt: Sendable, Equatable {
    /// The version number, counting from 1 (0: never published).
    public var version: UInt64
    /// The content's length in bytes.
    public var length: Int
    /// CRC-64/XZ of the content.
    public var crc64: UInt64
    /// When it was published, ns since the Unix epoch.
    public var publishedAtNanoseconds: UInt64

    public init(version: UInt64, length: Int, crc64: UInt64, publishedAtNanoseconds: UInt64) {
        self.version = version
        self.length = length
        self.crc64 = crc64
        self.publishedAtNanoseconds = publishedAtNanoseconds
    }

    func write(to writer: inout ByteWriter) {
        writer.write(version)
        writer.write(UInt64(length))
        writer.write(crc64)
        writer.write(publishedAtNanoseconds)
    }

    static func read(from reader: inout ByteReader) throws(ProtocolError) -> PublishReceipt {
        let version = try reader.read(UInt64.self, "version")
        let length = try reader.read(UInt64.self, "length")
        guard length <= UInt64(Int.max) else { throw .malformed("version length \(length) is beyond any segment's capacity") }
        return PublishReceipt(version: version, length: Int(length), crc64: try reader.read(UInt64.self, "crc64"),
                              publishedAtNanoseconds: try reader.read(UInt64.self, "published at"))
    }
}

/// A message from the daemon: a reply to a request (same request id) or an unsolicited event.
public enum ServerMessage: Sendable, Equatable {
    case ok
    case helloOK(protocolVersion: UInt32, maximumFrameSize: UInt32, daemonVersion: String)
    case opened(OpenedSegment)
    /// The latest version at subscription time (all zero: never published).
    case subscribed(PublishReceipt)
    case published(PublishReceipt)
    case statusReport(json: [UInt8])
    /// A status report too large for a frame: its JSON is the first `length` bytes of the
    /// descriptor attached to the frame.
    case statusReportFile(length: UInt64)
    /// A publish ring is attached: the segment's capacity and latest version.
    case ringAttached(capacity: UInt64, latestVersion: UInt64)
    /// The owner's metrics, Prometheus text format.
    case metricsReport(text: [UInt8])
    /// Metrics too large for a frame: the first `length` bytes of the attached descriptor.
    case metricsReportFile(length: UInt64)
    case error(ProtocolError)
    case versionEvent(segment: String, PublishReceipt)
    case retiredEvent(segment: String)
    /// A mirrored segment turned stale (its source went quiet) or fresh again; `changedAt` is
    /// when, in ns since the Unix epoch.
    case stalenessEvent(segment: String, stale: Bool, changedAtNanoseconds: UInt64)

    public var type: MessageType {
        switch self {
        case .ok: return .ok
        case .helloOK: return .helloOK
        case .opened: return .opened
        case .subscribed: return .subscribed
        case .published: return .published
        case .statusReport: return .statusReport
        case .statusReportFile: return .statusReportFile
        case .ringAttached: return .ringAttached
        case .metricsReport: return .metricsReport
        case .metricsReportFile: return .metricsReportFile
        case .error: return .error
        case .versionEvent: return .versionEvent
        case .retiredEvent: return .retiredEvent
        case .stalenessEvent: return .stalenessEvent
        }
    }

    /// Whether this is an event (request id 0) rather than a reply.
    public var isEvent: Bool {
        switch self {
        case .versionEvent, .retiredEvent, .stalenessEvent: return true
        default: return false
        }
    }

    public func encode(requestID: UInt32) -> [UInt8] {
        var body = Frame.begin(type: type, requestID: requestID, bodyCapacity: 64)
        switch self {
        case .ok:
            break
        case let .helloOK(version, maximumFrame, daemonVersion):
            body.write(version)
            body.write(maximumFrame)
            body.write(string: daemonVersion)
        case .opened(let segment):
            body.write(segment.capacity)
            body.write(segment.slotCount)
            body.write(segment.layoutVersion)
            body.write(segment.mappingSize)
            body.write(segment.latestVersion)
        case .subscribed(let info):
            info.write(to: &body)
        case .published(let info):
            info.write(to: &body)
        case .statusReport(let json):
            body.write(raw: json)
        case .statusReportFile(let length), .metricsReportFile(let length):
            body.write(length)
        case .metricsReport(let text):
            body.write(raw: text)
        case let .ringAttached(capacity, latestVersion):
            body.write(capacity)
            body.write(latestVersion)
        case .error(let error):
            body.write(error.code.rawValue)
            body.write(string: error.message)
        case let .versionEvent(segment, info):
            body.write(string: segment)
            info.write(to: &body)
        case .retiredEvent(let segment):
            body.write(string: segment)
        case let .stalenessEvent(segment, stale, changedAt):
            body.write(string: segment)
            body.write(UInt32(stale ? 1 : 0))
            body.write(changedAt)
        }
        return Frame.finish(body)
    }

    public static func decode(type: UInt16, body: UnsafeRawBufferPointer) throws(ProtocolError) -> ServerMessage {
        var reader = ByteReader(body)
        let message: ServerMessage
        switch MessageType(rawValue: type) {
        case .ok:
            message = .ok
        case .helloOK:
            message = .helloOK(protocolVersion: try reader.read(UInt32.self, "protocol version"),
                               maximumFrameSize: try reader.read(UInt32.self, "maximum frame size"),
                               daemonVersion: try reader.readString("daemon version"))
        case .opened:
            message = .opened(OpenedSegment(
                capacity: try reader.read(UInt64.self, "capacity"), slotCount: try reader.read(UInt32.self, "slot count"),
                layoutVersion: try reader.read(UInt32.self, "layout version"),
                mappingSize: try reader.read(UInt64.self, "mapping size"),
                latestVersion: try reader.read(UInt64.self, "latest version")))
        case .subscribed:
            message = .subscribed(try PublishReceipt.read(from: &reader))
        case .published:
            message = .published(try PublishReceipt.read(from: &reader))
        case .statusReport:
            message = .statusReport(json: Array(reader.readRest()))
        case .statusReportFile:
            message = .statusReportFile(length: try reader.read(UInt64.self, "length"))
        case .metricsReport:
            message = .metricsReport(text: Array(reader.readRest()))
        case .metricsReportFile:
            message = .metricsReportFile(length: try reader.read(UInt64.self, "length"))
        case .ringAttached:
            message = .ringAttached(capacity: try reader.read(UInt64.self, "capacity"),
                                    latestVersion: try reader.read(UInt64.self, "latest version"))
        case .error:
            let raw = try reader.read(UInt16.self, "error code")
            let text = try reader.readString("error message")
            message = .error(ProtocolError(ErrorCode(rawValue: raw) ?? .internalError, text))
        case .versionEvent:
            message = .versionEvent(segment: try reader.readString("segment"), try PublishReceipt.read(from: &reader))
        case .retiredEvent:
            message = .retiredEvent(segment: try reader.readString("segment"))
        case .stalenessEvent:
            let segment = try reader.readString("segment")
            let stale = try reader.read(UInt32.self, "stale")
            guard stale <= 1 else { throw .malformed("STALENESS stale is \(stale), not 0 or 1") }
            message = .stalenessEvent(segment: segment, stale: stale == 1, changedAtNanoseconds: try reader.read(UInt64.self, "changed at"))
        default:
            throw ProtocolError(.unknownMessageType, "unknown daemon message type 0x\(String(type, radix: 16))")
        }
        try reader.expectEnd("\(message.type)")
        return message
    }
}

/// Frame assembly shared by requests and daemon messages.
public enum Frame {
    /// Starts a frame: the header with a body length to be filled in by ``finish(_:)``; the body
    /// is then written after it into the same buffer.
    public static func begin(type: MessageType, requestID: UInt32, bodyCapacity: Int) -> ByteWriter {
        var frame = ByteWriter(reservingCapacity: ControlProtocol.headerSize + bodyCapacity)
        frame.write(type.rawValue)
        frame.write(UInt16(0))
        frame.write(requestID)
        frame.write(UInt32(0))
        return frame
    }

    /// Completes a frame started by ``begin(type:requestID:bodyCapacity:)``.
    public static func finish(_ frame: ByteWriter) -> [UInt8] {
        var bytes = frame.bytes
        let bodyLength = UInt32(bytes.count - ControlProtocol.headerSize).littleEndian
        withUnsafeBytes(of: bodyLength) { bytes.replaceSubrange(8..<12, with: $0) }
        return bytes
    }

    /// The body of a frame whose header has been parsed.
    public static func body(of frame: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: frame[ControlProtocol.headerSize...])
    }
}
