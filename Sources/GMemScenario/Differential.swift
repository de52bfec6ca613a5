import GMemBackend

/// Runs every step on two backends (the model and the kernel) and reports any
/// difference in result, errno, value, bytes or exit as a divergence.
///
/// Values that name host resources (fd numbers, mapping addresses) are not
/// compared: they differ between any two runs of the same program.
public final class DifferentialRunner {
    public let first: ScenarioRunner
    public let second: ScenarioRunner

    /// Set once a step ran on one backend and was skipped on the other: from then on
    /// the two systems are in different states and comparing them would mislead.
    private var desynchronized: String?

    /// How the last step's two observations differed (each side described), or nil.
    public private(set) var lastDivergence: (String, String)?

    public init(_ a: any Backend, _ b: any Backend) {
        first = ScenarioRunner(backend: a)
        second = ScenarioRunner(backend: b)
    }

    public var name: String { "\(first.backend.name)+\(second.backend.name)" }

    public func run(_ scenario: Scenario, report: (StepReport) -> Void) -> Summary {
        var summary = Summary()
        let lacking = ScenarioRunner.lacking(scenario, on: [second.backend, first.backend])
            ?? second.applyPolicies(scenario) ?? first.applyPolicies(scenario)
        for step in scenario.steps {
            let r = lacking.map { StepReport.skipped(step, $0, backend: name) } ?? run(step)
            summary.add(r)
            report(r)
        }
        return summary
    }

    public func run(_ step: Step) -> StepReport {
        if let why = desynchronized { return .skipped(step, why, backend: name) }
        let a = first.run(step)
        let b = second.run(step)
        var report = b
        report.backend = name
        if a.status == .skipped || b.status == .skipped {
            let who = a.status == .skipped ? first.backend.name : second.backend.name
            let why = (a.status == .skipped ? a.message : b.message) ?? ""
            report.status = .skipped
            report.observation = nil
            report.message = "\(who): \(why)"
            if a.status != b.status && !step.op.isReadOnly {
                desynchronized = "not compared: step \(step.index) ran on one backend only"
            }
            return report
        }
        lastDivergence = nil
        if let difference = Self.divergence(step, a.observation!, b.observation!) {
            lastDivergence = difference
            report.status = .failed
            report.message = "divergence: \(first.backend.name) \(difference.0), \(second.backend.name) \(difference.1)"
            return report
        }
        if a.status == .failed || b.status == .failed {
            report.status = .failed
            report.message = (a.status == .failed ? a.message : b.message).map { "both backends: \($0)" }
        }
        return report
    }

    /// The first way two observations differ, each side described, or nil.
    static func divergence(_ step: Step, _ a: Observation, _ b: Observation) -> (String, String)? {
        if a.result != b.result {
            return (a.result.description + (a.exit.map { " " + $0.rendered } ?? ""),
                    b.result.description + (b.exit.map { " " + $0.rendered } ?? ""))
        }
        if a.exit != b.exit { return ("exit " + (a.exit?.rendered ?? "none"), "exit " + (b.exit?.rendered ?? "none")) }
        if a.bytes != b.bytes {
            return ("bytes " + BytesSyntax.describe(a.bytes ?? []), "bytes " + BytesSyntax.describe(b.bytes ?? []))
        }
        let va = comparable(step, a.value)
        let vb = comparable(step, b.value)
        if va != vb { return ("value " + (va?.rendered ?? "none"), "value " + (vb?.rendered ?? "none")) }
        return nil
    }

    /// A step's value without the keys that name host resources.
    static func comparable(_ step: Step, _ value: JSON?) -> JSON? {
        guard case .object(var o)? = value else { return value }
        switch step.op {
        case .createVM, .createVCPU, .createGuestMemfd, .memfdCreate: o["fd"] = nil
        case .fork: o["pid"] = nil
        case .mmap: o["addr"] = nil
        default: break
        }
        return .object(o)
    }
}
