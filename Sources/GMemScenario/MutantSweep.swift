import GMemBackend
import GMemModel

/// One mutant against one race file: did the explorer find it, how soon.
public struct MutantCatch: Sendable {
    public var mutant: Mutant
    public var file: String
    /// Schedules run until the violation (or in all, when none was found).
    public var schedules: Int
    public var states: Int
    public var steps: Int
    public var seconds: Double
    /// The shrunk failing schedule; nil when the mutant went unnoticed.
    public var schedule: Schedule?
    /// The first violation it printed.
    public var violation: Violation?
    public var caught: Bool { schedule != nil }
}

/// Runs each file's declared mutants (`"catches"`) under the exhaustive explorer:
/// the proof that the explorer finds what the file says it does.
public enum MutantSweep {
    /// Every (file, mutant it catches) pair, in file order. Files whose setup fails
    /// under a mutant count as not caught.
    ///
    /// - Complexity: one exhaustive exploration per pair.
    public static func run(_ scenarios: [Scenario], preemptionBound: Int = 2, config: ModelConfig = .mainline) -> [MutantCatch] {
        var out: [MutantCatch] = []
        let clock = ContinuousClock()
        for s in scenarios {
            for m in s.catches {
                var c = config
                c.mutants = [m]
                var summary = ExploreSummary()
                let elapsed = clock.measure {
                    let r = ExploreRunner(s, config: c)
                    summary = r.explorer.exhaustive(preemptionBound: preemptionBound)
                }
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                let ce = summary.counterexample.flatMap { $0.violations.isEmpty ? nil : $0 }
                out.append(MutantCatch(mutant: m, file: s.file, schedules: summary.schedules, states: summary.states,
                                       steps: summary.steps, seconds: seconds, schedule: ce?.schedule, violation: ce?.violations.first))
            }
        }
        return out
    }

    /// Mutants no file declares: the explorer is not shown to catch them.
    public static func uncovered(_ scenarios: [Scenario]) -> [Mutant] {
        let covered = Set(scenarios.flatMap(\.catches))
        return Mutant.allCases.filter { !covered.contains($0) }
    }
}

extension Violation {
    /// `{"invariant", "page", "parties", "detail"}`, as check_invariants reports it.
    public var json: JSON {
        .object(JSONObject([
            "invariant": .string(invariant.rawValue), "page": .string(page),
            "parties": .array(parties.map { .string($0) }), "detail": .string(detail),
        ]))
    }
}

extension TraceEntry {
    public var json: JSON { .object(JSONObject(["actor": .string(actor), "step": .string(step), "saw": .string(saw)])) }
}

extension MutantCatch {
    /// One line of `gmem explore --mutants --json`.
    public var json: JSON {
        var o = JSONObject([
            "mutant": .string(mutant.rawValue), "file": .string(file), "caught": .bool(caught),
            "schedules": .int(schedules), "states": .int(states), "steps": .int(steps),
            "seconds": .number(String(format6(seconds))),
        ])
        if let schedule { o["schedule"] = .string(schedule.description) }
        if let violation { o["violation"] = violation.json }
        return .object(o)
    }
}

/// Seconds with microsecond resolution, as JSON number text.
public func format6(_ seconds: Double) -> String {
    let micros = (seconds * 1e6).rounded()
    let whole = Int(micros / 1e6)
    let frac = Int(micros) - whole * 1_000_000
    let digits = String(frac)
    return "\(whole)." + String(repeating: "0", count: 6 - digits.count) + digits
}
