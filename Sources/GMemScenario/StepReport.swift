import GMemBackend

/// What a step did, before it is compared with what it expected.
public struct Observation: Hashable, Sendable {
    public var result: Outcome
    public var value: JSON?
    public var bytes: [UInt8]?
    public var exit: JSON?
}

/// The verdict on one step.
public struct StepReport: Hashable, Sendable {
    public enum Status: String, Hashable, Sendable { case passed, failed, skipped }
    public var index: Int
    public var op: String
    public var status: Status
    /// nil when the step was skipped before it ran.
    public var observation: Observation?
    /// Why it failed or was skipped.
    public var message: String?
    public var backend: String
}

extension StepReport {
    static func skipped(_ step: Step, _ why: String, backend: String) -> StepReport {
        StepReport(index: step.index, op: step.opName, status: .skipped, observation: nil, message: why, backend: backend)
    }
}

/// Totals over steps.
public struct Summary: Hashable, Sendable {
    public var passed = 0
    public var failed = 0
    public var skipped = 0
    public init() {}
    public mutating func add(_ r: StepReport) {
        switch r.status {
        case .passed: passed += 1
        case .failed: failed += 1
        case .skipped: skipped += 1
        }
    }
    public mutating func add(_ s: Summary) {
        passed += s.passed
        failed += s.failed
        skipped += s.skipped
    }
    /// "N passed, N failed" plus ", N skipped" where steps were skipped.
    public var line: String {
        "\(passed) passed, \(failed) failed" + (skipped > 0 ? ", \(skipped) skipped" : "")
    }
}
