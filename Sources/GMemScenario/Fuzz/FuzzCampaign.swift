import GMemBackend

/// Something a fuzz sequence showed: two backends disagreeing on a step, or (on the
/// model alone) an invariant broken after it.
public struct FuzzFinding: Hashable, Sendable {
    public enum Kind: String, Hashable, Sendable {
        case divergence
        case violation
    }
    public var kind: Kind
    /// The index of the step that showed it, in `steps`.
    public var step: Int
    public var op: String
    /// What each side answered (divergence), or the violation.
    public var first: String
    public var second: String
    /// One line that identifies the finding's class, for counting distinct ones:
    /// the op and how each side answered, without the numbers that vary.
    public var signature: String
    /// The sequence that shows it: after minimization, the shortest found.
    public var steps: [JSON]

    /// Why this is what the kernel does rather than a model bug, when it is one of
    /// the documented hazards (docs/fuzzing.md), else nil.
    public var known: String? {
        FuzzFinding.knownHazards.first { first.contains($0.match) }?.why
    }

    /// Findings that are the kernel's own behaviour, which the model reproduces on
    /// purpose and the invariants flag as the hazard it is.
    public static let knownHazards: [(match: String, why: String)] = [
        ("the CPU maps a different page than the pin holds",
         "punching (or truncating) a pinned shmem page drops it from the page cache while the pin keeps the old page: "
             + "the CPU faults a new page and the pin holder sees the old one (why QEMU's RamDiscardManager tells VFIO first); "
             + "a short-term read-only pin may likewise see the process COW away from it (only long-term ones are unshared)"),
    ]

    /// The reproducer as a scenario file: every step observed (`"expect": "any"`) but
    /// the one that shows the finding, which expects what the second backend (the
    /// kernel) answered, with both answers in its comment.
    public func scenario(name: String, description: String) -> JSON {
        var out = steps
        if kind == .divergence, case .object(var o) = out[step] {
            o["comment"] = .string("model: \(first); kernel: \(second)")
            out[step] = .object(o)
        }
        var top = JSONObject()
        top["name"] = .string(name)
        top["description"] = .string(description)
        top["steps"] = .array(out)
        return .object(top)
    }
}

/// Runs generated sequences on fresh backends, reports the first finding of each,
/// and shrinks a finding to the shortest sequence that still shows it.
public final class FuzzCampaign {
    /// Fresh backends for one sequence: one (the model, checked) or two (compared).
    public let makeBackends: () throws(BackendError) -> [any Backend]
    public var stepsCompared = 0
    public var stepsSkipped = 0
    /// Why steps were skipped, by reason with names and numbers taken out.
    public var skipReasons: [String: Int] = [:]

    public init(makeBackends: @escaping () throws(BackendError) -> [any Backend]) {
        self.makeBackends = makeBackends
    }

    /// The first finding `steps` shows, or nil. `count`: whether the steps count
    /// toward the campaign's totals (not while minimizing).
    public func run(_ steps: [JSON], count: Bool = true) throws(BackendError) -> FuzzFinding? {
        let scenario: Scenario
        do {
            scenario = try ScenarioParser.parse(json: .object(JSONObject(["name": .string("fuzz"), "steps": .array(steps)])), file: "fuzz")
        } catch {
            return nil  // a shrunk sequence that refers to a removed handle shows nothing
        }
        let backends = try makeBackends()
        if backends.count == 2 {
            let d = DifferentialRunner(backends[0], backends[1])
            for step in scenario.steps {
                let r = d.run(step)
                if count { tally(r) }
                if let (a, b) = d.lastDivergence {
                    return FuzzFinding(kind: .divergence, step: step.index, op: step.opName, first: a, second: b,
                                       signature: "\(step.opName): \(backends[0].name) \(Self.shape(a)), \(backends[1].name) \(Self.shape(b))",
                                       steps: steps)
                }
            }
            return nil
        }
        let runner = ScenarioRunner(backend: backends[0])
        for step in scenario.steps {
            let r = runner.run(step)
            if count { tally(r) }
            let violations = (try? backends[0].checkInvariants()) ?? []
            if let v = violations.first {
                return FuzzFinding(kind: .violation, step: step.index, op: step.opName, first: v.description, second: "",
                                   signature: "\(step.opName): \(v.invariant.rawValue): \(Self.shape(v.detail))", steps: steps)
            }
        }
        return nil
    }

    func tally(_ r: StepReport) {
        guard r.status == .skipped else {
            stepsCompared += 1
            return
        }
        stepsSkipped += 1
        skipReasons[Self.reasonClass(r.message ?? ""), default: 0] += 1
    }

    /// A skip reason without the parts that vary: quoted names and numbers.
    static func reasonClass(_ message: String) -> String {
        var out = ""
        var quoted = false
        for c in message {
            // A quote opens a name after a space or a bracket ("handle 'vm1'"), not in "harness's".
            if c == "'" && (quoted || out.isEmpty || out.hasSuffix(" ") || out.hasSuffix("(")) {
                quoted.toggle()
                if quoted { out += "'…'" }
                continue
            }
            if quoted { continue }
            if c.isNumber { if !out.hasSuffix("N") { out += "N" }; continue }
            out.append(c)
        }
        return out
    }

    /// An answer without its numbers: "EINVAL", "bytes", "exit mmio", "value".
    static func shape(_ answer: String) -> String {
        let words = answer.split(separator: " ").prefix(3).filter { w in !w.contains(where: \.isNumber) && !w.hasPrefix("{") && !w.hasPrefix("[") }
        return words.prefix(2).joined(separator: " ")
    }

    /// The shortest sequence found that still shows a finding with the same
    /// signature: the tail after the step is dropped, then chunks of steps, then single
    /// steps, until nothing more can go (delta debugging). Each try runs on fresh
    /// backends; `budget` bounds the tries.
    public func minimize(_ finding: FuzzFinding, budget: Int = 400) -> FuzzFinding {
        var best = finding
        best.steps = Array(finding.steps.prefix(finding.step + 1))
        var tries = 0
        func attempt(_ candidate: [JSON]) -> FuzzFinding? {
            guard tries < budget else { return nil }
            tries += 1
            guard let f = try? run(candidate, count: false), f.signature == finding.signature else { return nil }
            return f
        }
        if let f = attempt(best.steps) { best = f } else { return finding }
        var chunk = max(best.steps.count / 2, 1)
        while true {
            var i = 0
            var removed = false
            while i < best.steps.count {
                var candidate = best.steps
                candidate.removeSubrange(i..<min(i + chunk, candidate.count))
                if let f = attempt(candidate) {
                    best = f
                    best.steps = Array(f.steps.prefix(f.step + 1))
                    removed = true
                } else {
                    i += chunk
                }
            }
            if chunk == 1 && !removed { break }
            if !removed { chunk = max(chunk / 2, 1) }
            if tries >= budget { break }
        }
        return best
    }
}
