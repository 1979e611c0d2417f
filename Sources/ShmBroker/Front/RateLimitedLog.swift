/// Bounds how often one kind of event is logged: at most `linesPerInterval` lines per interval;
/// the events past that are counted, and the count is reported by the next line or by
/// ``takeSuppressed(now:)``. One user opening connections in a loop must not flood the journal
/// (and push everything else out of it).
struct RateLimitedLog {
    let linesPerInterval: Int
    let intervalNanoseconds: UInt64
    private var intervalStart: UInt64 = 0
    private var linesInInterval = 0
    private var suppressed = 0

    init(linesPerInterval: Int, intervalNanoseconds: UInt64) {
        self.linesPerInterval = linesPerInterval
        self.intervalNanoseconds = intervalNanoseconds
    }

    /// Records one event at `now`; calls `log` (with the count suppressed since the last line,
    /// if any) when it may be logged.
    mutating func record(now: UInt64, _ log: (Int?) -> Void) {
        if now &- intervalStart >= intervalNanoseconds {
            intervalStart = now
            linesInInterval = 0
        }
        guard linesInInterval < linesPerInterval else {
            suppressed += 1
            return
        }
        linesInInterval += 1
        let count = suppressed
        suppressed = 0
        log(count > 0 ? count : nil)
    }

    /// The events suppressed and not yet reported, once their interval is over; nil if none.
    mutating func takeSuppressed(now: UInt64) -> Int? {
        guard suppressed > 0, now &- intervalStart >= intervalNanoseconds else { return nil }
        defer { suppressed = 0 }
        return suppressed
    }
}
