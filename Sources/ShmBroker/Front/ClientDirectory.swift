import ShmBrokerProtocol

/// The connected clients, by id, and how many connections each uid holds (for
/// `limits.maxClientsPerUser`). The event loop owns it.
final class ClientDirectory {
    private var byID: [UInt64: ClientConnection] = [:]
    private var perUID: [UInt32: Int] = [:]
    private var nextID: UInt64 = 1
    /// One receive buffer for every client: the loop handles one frame at a time.
    let receiveBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: ControlProtocol.maximumFrameSize + 1, alignment: 16)

    deinit { receiveBuffer.deallocate() }

    subscript(id: UInt64) -> ClientConnection? { byID[id] }
    var count: Int { byID.count }
    var values: Dictionary<UInt64, ClientConnection>.Values { byID.values }

    /// The id the next connection gets.
    func takeID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }

    /// Connections held by `uid` now.
    func connections(of uid: UInt32) -> Int { perUID[uid, default: 0] }

    func add(_ client: ClientConnection) {
        byID[client.id] = client
        perUID[client.credentials.uid, default: 0] += 1
    }

    func remove(_ client: ClientConnection) {
        guard byID.removeValue(forKey: client.id) != nil else { return }
        let held = perUID[client.credentials.uid, default: 1]
        perUID[client.credentials.uid] = held > 1 ? held - 1 : nil
    }
}
