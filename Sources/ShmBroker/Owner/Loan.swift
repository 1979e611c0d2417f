import ShmBrokerCore

extension OwnedSegment {
    /// The next version's slot, lent to the caller to fill in place over time: write into
    /// ``buffer`` anywhere on the publishing thread, then ``publish()``, or drop the loan to leave
    /// the segment as it was. Readers keep reading the latest version meanwhile.
    ///
    /// ```swift
    /// var loan = try segment.loan(length: frameSize)
    /// for row in stride(from: 0, to: frameSize, by: rowBytes) {
    ///     camera.capture(row: row, into: loan.buffer)
    ///     loan.markWritten(through: row + rowBytes)   // checksummed now, while in cache
    /// }
    /// let receipt = loan.publish()                    // the rest checksummed, then visible
    /// ```
    ///
    /// A loan filled in order costs one pass over memory: ``append(_:)`` copies and checksums
    /// together, and ``markWritten(through:)`` checksums what the caller wrote in place while it is
    /// still in cache. Whatever was not checksummed that way is checksummed by ``publish()``.
    ///
    /// While a loan is out, the segment is this thread's: another publish fails with
    /// `concurrent-publish`, and a reload that resizes or retires the segment waits for the loan
    /// to end, so keep loans short.
    public struct Loan: ~Copyable {
        // Unmanaged: a type that `discard`s itself holds only trivial values; the segment is
        // retained for the loan's lifetime by hand (passRetained, released when the loan ends).
        private let segment: Unmanaged<OwnedSegment>
        private let writer: Unmanaged<SegmentWriter>
        private var reservation: SegmentWriter.SlotReservation

        init(segment: OwnedSegment, writer: Unmanaged<SegmentWriter>, reservation: SegmentWriter.SlotReservation) {
            self.segment = Unmanaged.passRetained(segment)
            self.writer = writer
            self.reservation = reservation
        }

        /// The slot's payload area: exactly the length asked for.
        public var buffer: UnsafeMutableRawBufferPointer { reservation.buffer }

        /// Bytes of the payload final and checksummed so far.
        public var written: Int { reservation.written }

        /// Copies `bytes` into the buffer after the ``written`` bytes, checksumming them in the
        /// same pass.
        ///
        /// - Precondition: they fit in the length lent.
        public mutating func append(_ bytes: UnsafeRawBufferPointer) { reservation.append(bytes) }

        /// Declares the first `end` bytes of the buffer final and checksums those not yet
        /// checksummed, while they are in cache. They must not change afterwards.
        ///
        /// - Precondition: `written <= end <= buffer.count`.
        public mutating func markWritten(through end: Int) { reservation.markWritten(through: end) }

        /// Publishes what the buffer holds as the next version (CRC-64 computed over what was not yet checksummed)
        /// and wakes readers, as ``OwnedSegment/publish(_:)-(UnsafeRawBufferPointer)`` does.
        @discardableResult
        public consuming func publish() -> PublishReceipt {
            let receipt = writer._withUnsafeGuaranteedRef { $0.commit(reservation) }
            let owned = segment.takeRetainedValue()
            owned.announce(length: receipt.length)
            owned.leave()
            discard self
            return receipt
        }

        deinit {
            // Dropped unpublished: nothing became visible; the slot is the next publish's.
            let owned = segment.takeRetainedValue()
            owned.leave()
        }
    }

    /// Lends the next version's slot for `length` bytes (see ``Loan``).
    ///
    /// - Throws: ``OwnerError/payloadTooLarge(segment:length:capacity:)`` (nothing touched),
    ///   ``OwnerError/concurrentPublish(_:)`` while another publish or loan is in progress, or
    ///   ``OwnerError/retired(_:)``.
    public func loan(length: Int) throws(OwnerError) -> Loan {
        let writer = try enter()
        do {
            let reservation = try writer._withUnsafeGuaranteedRef { writer throws(SegmentError) in try writer.reserve(length: length) }
            return Loan(segment: self, writer: writer, reservation: reservation)
        } catch {
            let capacity = writer._withUnsafeGuaranteedRef { $0.layout.capacity }
            leave()
            throw .payloadTooLarge(segment: name, length: length, capacity: capacity)
        }
    }

    // MARK: Typed payloads

    /// Publishes the bytes of a plain value (`BitwiseCopyable`: numbers, tuples and structs of
    /// them) as the next version; readers get it back with
    /// `SegmentHandle.read(_:)` (Swift) or `struct.unpack` / `numpy.frombuffer` (Python).
    @discardableResult
    public func publish<Value: BitwiseCopyable>(value: Value) throws(OwnerError) -> PublishReceipt {
        var copy = value
        let outcome = withUnsafeBytes(of: &copy) { bytes in Result { () throws(OwnerError) in try publish(bytes) } }
        return try outcome.get()
    }

    /// Publishes an array of plain values, packed at their stride, as the next version.
    @discardableResult
    public func publish<Value: BitwiseCopyable>(values: [Value]) throws(OwnerError) -> PublishReceipt {
        let outcome = values.withUnsafeBytes { bytes in Result { () throws(OwnerError) in try publish(bytes) } }
        return try outcome.get()
    }
}
