@testable import ShmBroker
import ShmBrokerConfig
import XCTest

/// The reload decision on its own: which segments a new configuration adds, resizes, retires and
/// updates, with no memory or socket involved.
final class ReloadPlanTests: XCTestCase {
    func definition(_ name: String, _ capacity: Int = 64, slots: Int = 3, readers: AccessList = AccessList(everyone: true)) -> SegmentDefinition {
        SegmentDefinition(name: name, capacity: capacity, slots: slots, readers: readers)
    }

    func testAnIdenticalConfigurationChangesNothing() {
        let running = [definition("a"), definition("b")]
        let plan = ReloadPlan(running: running, new: running)
        XCTAssertTrue(plan.isEmpty)
        XCTAssertEqual(plan.toCreate, [])
        XCTAssertEqual(plan.order, ["a", "b"])
    }

    func testAddsResizesRetiresAndUpdatesInTheNewOrder() {
        let running = [definition("keep"), definition("grow"), definition("gone"), definition("private")]
        let new = [definition("new", 128), definition("grow", 4096), definition("keep"),
                   definition("private", readers: AccessList(users: [0])), definition("slots", slots: 2)]
        let plan = ReloadPlan(running: running, new: new)
        XCTAssertEqual(plan.added.map(\.name), ["new", "slots"])
        XCTAssertEqual(plan.resized.map(\.name), ["grow"])
        XCTAssertEqual(plan.retired, ["gone"])
        XCTAssertEqual(plan.updated.map(\.name), ["private"])
        XCTAssertEqual(plan.toCreate.map(\.name), ["new", "grow", "slots"], "created in the new configuration's order")
        XCTAssertEqual(plan.order, ["new", "grow", "keep", "private", "slots"])
    }

    func testAChangeOfSlotsAloneIsAResize() {
        let plan = ReloadPlan(running: [definition("s", slots: 3)], new: [definition("s", slots: 4)])
        XCTAssertEqual(plan.resized.map(\.name), ["s"])
        XCTAssertEqual(plan.updated, [])
    }

    func testAnEmptyConfigurationRetiresEverything() {
        let plan = ReloadPlan(running: [definition("a"), definition("b")], new: [])
        XCTAssertEqual(plan.retired, ["a", "b"])
        XCTAssertEqual(plan.order, [])
    }
}
