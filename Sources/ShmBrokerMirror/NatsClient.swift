import CNats
import Foundation
import Logging
import Synchronization

/// A failed NATS call: the operation, libnats's status and its detailed text (for a
/// permission refusal, the server's own words, which arrive asynchronously).
public struct NatsError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var status: UInt32
    public var text: String

    init(_ operation: String, _ status: natsStatus) {
        self.operation = operation
        self.status = status.rawValue
        var detailed = ""
        var last = natsStatus(0)
        if let message = nats_GetLastError(&last) { detailed = String(cString: message) }
        let summary = String(cString: natsStatus_GetText(status))
        text = detailed.isEmpty ? summary : detailed
    }

    public var isTimeout: Bool { status == NATS_TIMEOUT.rawValue }
    public var isNotFound: Bool { status == NATS_NOT_FOUND.rawValue }
    /// A compare-and-set put whose expected revision was not the key's last.
    public var isWrongLastRevision: Bool { text.lowercased().contains("wrong last sequence") }

    /// A short stable name for the metrics' `reason` label.
    public var cause: String {
        if isTimeout { return "timeout" }
        if isWrongLastRevision { return "fenced" }
        let lowered = text.lowercased()
        if lowered.contains("permission") || lowered.contains("not permitted") || lowered.contains("authorization") { return "permission" }
        if lowered.contains("no responders") { return "no-responders" }
        if status == NATS_CONNECTION_CLOSED.rawValue || status == NATS_CONNECTION_DISCONNECTED.rawValue
            || status == NATS_NOT_YET_CONNECTED.rawValue { return "disconnected" }
        return "error"
    }

    public var description: String { "\(operation): \(text)" }
}

/// A value read from the bucket.
public struct BucketEntry: Sendable {
    public var key: String
    public var bytes: [UInt8]
    public var revision: UInt64
    /// False for a delete or purge marker.
    public var isPut: Bool
}

/// One connection to a NATS cluster with its JetStream key-value bucket, over libnats. libnats
/// objects are safe to use from several threads (its documentation), which is why this class
/// is `@unchecked Sendable`; the only mutable state, the bucket handle, is set once under a lock.
public final class NatsClient: @unchecked Sendable {
    /// What the connection's asynchronous callbacks report: libnats calls them on its threads.
    final class Events: Sendable {
        let logger: Logger
        let lastAsyncError = Mutex<String?>(nil)
        let reconnects = Mutex<UInt64>(0)
        let connected = Mutex<Bool>(false)
        init(logger: Logger) { self.logger = logger }
    }

    private let connection: OpaquePointer
    private let jetStream: OpaquePointer
    /// A libnats object handle, which libnats lets any thread use.
    struct Handle: @unchecked Sendable { let pointer: OpaquePointer }
    private let bucketHandle = Mutex<Handle?>(nil)
    private let events: Events
    private let unmanagedEvents: Unmanaged<Events>
    public let bucketName: String

    /// Connects, trying each server once: the caller retries, so that it can log why (a TLS or
    /// credential mismatch is reported here with libnats's words) and stay responsive to signals.
    /// Once connected, libnats reconnects on its own, forever.
    ///
    /// - Parameters:
    ///   - settings: servers, credentials, TLS, bucket and timeouts from the mirror's config.
    ///   - name: the connection's name as the servers show it.
    ///   - logger: where connection events go (never a secret).
    public init(_ settings: NatsSettings, name: String, logger: Logger) throws(NatsError) {
        bucketName = settings.bucket
        events = Events(logger: logger)
        unmanagedEvents = Unmanaged.passRetained(events)
        var options: OpaquePointer?
        try Self.check("natsOptions_Create", natsOptions_Create(&options))
        guard let options else { throw NatsError("natsOptions_Create", NATS_NO_MEMORY) }
        defer { natsOptions_Destroy(options) }
        do throws(NatsError) {
            try Self.configure(options, settings, name: name, events: unmanagedEvents.toOpaque())
            var made: OpaquePointer?
            let status = natsConnection_Connect(&made, options)
            guard status == NATS_OK, let made else {
                throw NatsError("connect to \(settings.servers.joined(separator: ","))", status)
            }
            events.connected.withLock { $0 = true }
            connection = made
            var jsOptions = jsOptions()
            jsOptions_Init(&jsOptions)
            jsOptions.Wait = Int64(settings.requestTimeoutSeconds * 1000)
            var context: OpaquePointer?
            let jsStatus = natsConnection_JetStream(&context, made, &jsOptions)
            guard jsStatus == NATS_OK, let context else {
                natsConnection_Destroy(made)
                throw NatsError("JetStream context", jsStatus)
            }
            jetStream = context
        } catch {
            unmanagedEvents.release()
            throw error
        }
    }

    deinit {
        if let bucket = bucketHandle.withLock({ $0 }) { kvStore_Destroy(bucket.pointer) }
        jsCtx_Destroy(jetStream)
        natsConnection_Close(connection)
        natsConnection_Destroy(connection)
        unmanagedEvents.release()
    }

    private static func check(_ operation: String, _ status: natsStatus) throws(NatsError) {
        guard status == NATS_OK else { throw NatsError(operation, status) }
    }

    private static func configure(_ options: OpaquePointer, _ settings: NatsSettings, name: String,
                                  events: UnsafeMutableRawPointer) throws(NatsError) {
        var servers = settings.servers.map { strdup($0) }
        defer { servers.forEach { free($0) } }
        let count = Int32(servers.count)
        try servers.withUnsafeMutableBufferPointer { buffer throws(NatsError) in
            try buffer.withMemoryRebound(to: UnsafePointer<CChar>?.self) { rebound throws(NatsError) in
                try check("servers", natsOptions_SetServers(options, rebound.baseAddress, count))
            }
        }
        try check("name", natsOptions_SetName(options, name))
        try check("connect timeout", natsOptions_SetTimeout(options, Int64(settings.requestTimeoutSeconds * 1000)))
        try check("reconnects", natsOptions_SetMaxReconnect(options, -1))
        try check("reconnect wait", natsOptions_SetReconnectWait(options, 250))
        try check("ping interval", natsOptions_SetPingInterval(options, 1000))
        try check("pings out", natsOptions_SetMaxPingsOut(options, 3))
        switch settings.credentials {
        case .none:
            break
        case .credsFile(let path):
            try check("credentials file \(path)", natsOptions_SetUserCredentialsFromFiles(options, path, nil))
        case let .nkey(publicKey, seedFile):
            try check("nkey seed file \(seedFile)", natsOptions_SetNKeyFromSeed(options, publicKey, seedFile))
        case let .user(user, password):
            try check("user and password", natsOptions_SetUserInfo(options, user, password))
        }
        if let tls = settings.tls {
            try check("TLS", natsOptions_SetSecure(options, true))
            if let ca = tls.caFile { try check("TLS CA \(ca)", natsOptions_LoadCATrustedCertificates(options, ca)) }
            if let certificate = tls.certificateFile, let key = tls.keyFile {
                try check("TLS client certificate \(certificate)", natsOptions_LoadCertificatesChain(options, certificate, key))
            }
        }
        try check("error handler", natsOptions_SetErrorHandler(options, { connection, _, status, closure in
            guard let closure else { return }
            let events = Unmanaged<Events>.fromOpaque(closure).takeUnretainedValue()
            var text: UnsafePointer<CChar>?
            _ = natsConnection_GetLastError(connection, &text)
            let detail = text.map { String(cString: $0) } ?? ""
            let message = detail.isEmpty ? String(cString: natsStatus_GetText(status)) : detail
            let isNew = events.lastAsyncError.withLock { last -> Bool in
                defer { last = message }
                return last != message
            }
            if isNew { events.logger.error("NATS reported an error", metadata: ["error": "\(message)"]) }
        }, events))
        try check("disconnect handler", natsOptions_SetDisconnectedCB(options, { _, closure in
            guard let closure else { return }
            let events = Unmanaged<Events>.fromOpaque(closure).takeUnretainedValue()
            events.connected.withLock { $0 = false }
            events.logger.warning("disconnected from NATS; reconnecting")
        }, events))
        try check("reconnect handler", natsOptions_SetReconnectedCB(options, { connection, closure in
            guard let closure else { return }
            let events = Unmanaged<Events>.fromOpaque(closure).takeUnretainedValue()
            events.connected.withLock { $0 = true }
            events.reconnects.withLock { $0 += 1 }
            var url = [CChar](repeating: 0, count: 256)
            _ = natsConnection_GetConnectedUrl(connection, &url, url.count)
            let server = String(decoding: url.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            events.logger.notice("reconnected to NATS", metadata: ["server": "\(server)"])
        }, events))
    }

    /// Whether the connection is up now.
    public var isConnected: Bool { natsConnection_Status(connection) == NATS_CONN_STATUS_CONNECTED }
    /// Reconnections so far.
    public var reconnects: UInt64 { events.reconnects.withLock { $0 } }
    /// The last asynchronous error the server sent (a permission refusal arrives this way).
    public var lastAsyncError: String? { events.lastAsyncError.withLock { $0 } }

    /// Binds the bucket, creating it with `creation` if it does not exist (and `creation` is set).
    public func bindBucket(creation: BucketCreation?) throws(NatsError) {
        if bucketHandle.withLock({ $0 }) != nil { return }
        var store: OpaquePointer?
        var status = js_KeyValue(&store, jetStream, bucketName)
        if status == NATS_NOT_FOUND, let creation {
            var config = kvConfig()
            kvConfig_Init(&config)
            status = bucketName.withCString { bucket in
                config.Bucket = bucket
                config.History = 1
                config.Replicas = Int32(creation.replicas)
                config.StorageType = creation.memoryStorage ? js_MemoryStorage : js_FileStorage
                config.MaxValueSize = Int32(creation.maximumValueSize)
                return js_CreateKeyValue(&store, jetStream, &config)
            }
        }
        guard status == NATS_OK, let store else { throw NatsError("bucket \(bucketName)", status) }
        let handle = Handle(pointer: store)
        bucketHandle.withLock { $0 = handle }
    }

    private func bucket() throws(NatsError) -> OpaquePointer {
        guard let store = bucketHandle.withLock({ $0 }) else { throw NatsError("bucket \(bucketName) (not bound yet)", NATS_NOT_YET_CONNECTED) }
        return store.pointer
    }

    /// Puts `bytes` under `key`; with `expectedRevision`, only if that is still the key's last
    /// revision (0: only if the key does not exist). Returns the new revision.
    public func put(_ key: String, _ bytes: UnsafeRawBufferPointer, expectedRevision: UInt64? = nil) throws(NatsError) -> UInt64 {
        let store = try bucket()
        var revision: UInt64 = 0
        let status: natsStatus
        switch expectedRevision {
        case .none: status = kvStore_Put(&revision, store, key, bytes.baseAddress, Int32(bytes.count))
        case .some(0): status = kvStore_Create(&revision, store, key, bytes.baseAddress, Int32(bytes.count))
        case .some(let last): status = kvStore_Update(&revision, store, key, bytes.baseAddress, Int32(bytes.count), last)
        }
        try Self.check("put \(key)", status)
        return revision
    }

    /// The key's current value, or nil if it has none.
    public func get(_ key: String) throws(NatsError) -> BucketEntry? {
        let store = try bucket()
        var entry: OpaquePointer?
        let status = kvStore_Get(&entry, store, key)
        if status == NATS_NOT_FOUND { return nil }
        try Self.check("get \(key)", status)
        guard let entry else { return nil }
        defer { kvEntry_Destroy(entry) }
        return Self.entry(entry)
    }

    static func entry(_ entry: OpaquePointer) -> BucketEntry {
        let length = Int(kvEntry_ValueLen(entry))
        let bytes = kvEntry_Value(entry).map { Array(UnsafeRawBufferPointer(start: $0, count: length)) } ?? []
        return BucketEntry(key: kvEntry_Key(entry).map { String(cString: $0) } ?? "", bytes: bytes,
                           revision: kvEntry_Revision(entry), isPut: kvEntry_Operation(entry) == kvOp_Put)
    }

    /// Watches `key` (latest value first, then each new one); see ``BucketWatcher``.
    public func watch(_ key: String) throws(NatsError) -> BucketWatcher {
        let store = try bucket()
        var watcher: OpaquePointer?
        try Self.check("watch \(key)", kvStore_Watch(&watcher, store, key, nil))
        guard let watcher else { throw NatsError("watch \(key)", NATS_ERR) }
        return BucketWatcher(watcher)
    }

    /// Publishes on core NATS (no acknowledgement).
    public func publish(_ subject: String, _ bytes: [UInt8]) throws(NatsError) {
        let status = bytes.withUnsafeBytes { natsConnection_Publish(connection, subject, $0.baseAddress, Int32($0.count)) }
        try Self.check("publish \(subject)", status)
    }

    /// Subscribes on core NATS; messages are taken with ``CoreSubscription/next(timeoutMilliseconds:)``.
    public func subscribe(_ subject: String) throws(NatsError) -> CoreSubscription {
        var subscription: OpaquePointer?
        try Self.check("subscribe \(subject)", natsConnection_SubscribeSync(&subscription, connection, subject))
        guard let subscription else { throw NatsError("subscribe \(subject)", NATS_ERR) }
        return CoreSubscription(subscription)
    }
}

/// A key watch; one thread at a time calls ``next(timeoutMilliseconds:)``.
public final class BucketWatcher: @unchecked Sendable {
    private let watcher: OpaquePointer

    init(_ watcher: OpaquePointer) { self.watcher = watcher }

    deinit {
        kvWatcher_Stop(watcher)
        kvWatcher_Destroy(watcher)
    }

    /// The next value, nil when none came within the timeout (or the end of the initial values).
    public func next(timeoutMilliseconds: Int64) throws(NatsError) -> BucketEntry? {
        var entry: OpaquePointer?
        let status = kvWatcher_Next(&entry, watcher, timeoutMilliseconds)
        if status == NATS_TIMEOUT { return nil }
        guard status == NATS_OK else { throw NatsError("watch", status) }
        guard let entry else { return nil }
        defer { kvEntry_Destroy(entry) }
        return NatsClient.entry(entry)
    }
}

/// A core NATS subscription read synchronously.
public final class CoreSubscription: @unchecked Sendable {
    private let subscription: OpaquePointer

    init(_ subscription: OpaquePointer) { self.subscription = subscription }

    deinit {
        natsSubscription_Unsubscribe(subscription)
        natsSubscription_Destroy(subscription)
    }

    /// The next message's subject and bytes, nil on timeout.
    public func next(timeoutMilliseconds: Int64) throws(NatsError) -> (subject: String, bytes: [UInt8])? {
        var message: OpaquePointer?
        let status = natsSubscription_NextMsg(&message, subscription, timeoutMilliseconds)
        if status == NATS_TIMEOUT { return nil }
        guard status == NATS_OK, let message else { throw NatsError("next message", status) }
        defer { natsMsg_Destroy(message) }
        let length = Int(natsMsg_GetDataLength(message))
        let bytes = natsMsg_GetData(message).map { Array(UnsafeRawBufferPointer(start: $0, count: length)) } ?? []
        return (natsMsg_GetSubject(message).map { String(cString: $0) } ?? "", bytes)
    }
}
