/// A value that belongs to an event loop's thread, held by an object that other threads share
/// (the embedding owner): it is reached only through ``submit(_:)``, which runs the work on the
/// loop's thread, or on the caller's while the loop is not running (before it starts, after it
/// ended), when no other thread is in it. As swift-nio's `NIOLoopBound` does, the one unchecked
/// promise lives here, where the rule is enforced, rather than on every type that holds the value.
final class LoopBound<Value: AnyObject>: @unchecked Sendable {
    /// The loop the value belongs to (itself safe to use from any thread).
    let loop: EventLoop
    private let value: Value

    init(_ value: Value, loop: EventLoop) {
        self.value = value
        self.loop = loop
    }

    /// Runs `body` with the value on the loop's thread and returns its result; from any thread.
    func submit<T>(_ body: @escaping (Value) -> T) -> T {
        loop.submit { body(self.value) }
    }

    /// Runs `body` with the value on the calling thread, which is about to become the loop's:
    /// only the thread that then runs the loop (in `body`) calls this, once.
    func becomingTheLoop(_ body: (Value) -> Void) {
        body(value)
    }
}
