import GMemBackend

/// What the explorer's actors act on: the whole kernel, and what each actor carries
/// between its steps (a fault paused between resolve and install, a pin's id).
public struct World: Hashable {
    public var kernel: Kernel
    /// A paused fault per actor index.
    public var pending: [Int: PendingFault] = [:]
    /// A paused GUP-fast per actor index.
    public var gupFast: [Int: PendingGUPFast] = [:]
    /// A conversion between its check and its flip, per actor index.
    public var conversions: [Int: PendingConversion] = [:]
    /// A memslot deletion between marking the slot invalid and freeing it, per actor.
    public var memslotDeletes: [Int: PendingMemslotDelete] = [:]
    /// An IOMMU map between its ownership check and its install, per actor index.
    public var iommuMaps: [Int: PendingIOMMUMap] = [:]
    /// A close between its last fput and kvm_gmem_release(), per actor index.
    public var releases: [Int: PendingRelease] = [:]
    /// Per-actor registers (ids and results a later step needs).
    public var registers: [Int: UInt64] = [:]
    /// State of the layer that drives the kernel (a scenario runner's handle names),
    /// saved and restored with the world so each path sees its own.
    public var context: AnyHashable?

    public init(kernel: Kernel) { self.kernel = kernel }
}

/// What a step did, and where its actor goes next.
public struct StepResult: Sendable {
    public enum Next: Sendable, Hashable {
        case advance
        /// Back (or on) to this step of the same actor: a retry loop.
        case step(Int)
    }
    /// What the step saw, for the trace.
    public var saw: String
    public var next: Next
    /// Transition invariants (no leak, no loss) the step itself found broken, for
    /// steps whose effect only the layer that ran them knows (a scenario step).
    public var violations: [Violation]
    public init(_ saw: String, next: Next = .advance, violations: [Violation] = []) {
        self.saw = saw
        self.next = next
        self.violations = violations
    }
}

/// One atomic step: the kernel code between two points where the kernel takes or
/// drops a lock (or holds none), so another actor may run in between.
public struct ExploreStep {
    public var label: String
    public var run: (inout World, _ actor: Int) -> StepResult
    /// The step would sleep now (on a lock another actor holds): not runnable.
    public var blocked: ((World, _ actor: Int) -> Bool)?
    /// What the step may do to memory contents: the explorer checks no leak and no
    /// loss across it. nil: the step reports its own (`StepResult.violations`).
    public var effect: ContentEffect?
    public init(
        _ label: String, effect: ContentEffect? = .preserving, blocked: ((World, _ actor: Int) -> Bool)? = nil,
        _ run: @escaping (inout World, _ actor: Int) -> StepResult
    ) {
        self.label = label
        self.effect = effect
        self.blocked = blocked
        self.run = run
    }
}

/// A vCPU, a VMM thread, a host process or a device, as a straight-line program of
/// steps (with retry loops through `StepResult.Next.step`).
public struct ExploreActor {
    public var name: String
    public var steps: [ExploreStep]
    public init(_ name: String, _ steps: [ExploreStep]) {
        self.name = name
        self.steps = steps
    }
}

/// Which actor ran at each step, written compactly: actor indices joined by dots
/// ("0.1.0"). `gmem explore --replay` takes this string.
public struct Schedule: Hashable, Sendable, CustomStringConvertible {
    public var actors: [Int]
    public init(_ actors: [Int]) { self.actors = actors }
    public init?(parsing text: String) {
        var out: [Int] = []
        for part in text.split(separator: ".", omittingEmptySubsequences: false) {
            guard let n = Int(part), n >= 0 else { return nil }
            out.append(n)
        }
        actors = out
    }
    public var description: String { actors.map(String.init).joined(separator: ".") }
}

/// One line of a labelled trace.
public struct TraceEntry: Hashable, Sendable, CustomStringConvertible {
    public var actor: String
    public var step: String
    public var saw: String
    public var description: String { "\(actor): \(step): \(saw)" }
}

/// A schedule that breaks an invariant (or runs away), with what happened.
public struct Counterexample: Sendable {
    public var schedule: Schedule
    public var trace: [TraceEntry]
    public var violations: [Violation]
    /// The schedule hit the step bound: some actor keeps retrying (livelock).
    public var livelock: Bool
    /// Actors with steps left, all blocked (deadlock).
    public var deadlock = false
}

/// What an exploration covered.
public struct ExploreSummary: Sendable {
    /// Schedules the search ended: run to their end (every actor done, or stopped by
    /// a violation), or, in the exhaustive search, joined to a state whose
    /// continuations were already explored with as much preemption budget left.
    public var schedules = 0
    /// Distinct (world, program counters) states reached.
    public var states = 0
    /// Steps executed, over all schedules.
    public var steps = 0
    public var counterexample: Counterexample?
    public init() {}
}

/// Runs actors' steps in every order a strategy picks, checking the invariants after
/// each step: the kernel's races, found by construction rather than by luck.
public struct Explorer {
    public var initial: World
    public var actors: [ExploreActor]
    /// Steps one schedule may take before it counts as a livelock; nil: the programs'
    /// own steps once plus room for 1,000 retries (a long program is not a livelock).
    public var stepBound: Int?
    var effectiveStepBound: Int { stepBound ?? actors.reduce(0) { $0 + $1.steps.count } + 1_000 }
    /// The state invariants of a state reached in one step from a parent that held
    /// them all. The default looks only at what the step changed when it safely can
    /// (`Kernel.checkSystemInvariants(since:)`); tests replace it to compare.
    public var invariantCheck: (_ state: Kernel, _ parent: Kernel) -> [Violation] = { state, parent in
        // A small world is cheaper to check whole than to diff.
        state.phys.frames.count > 1024 ? state.checkSystemInvariants(since: parent) : state.checkSystemInvariants()
    }
    /// Called every `progressEvery` steps with the summary so far (long runs).
    public var onProgress: ((ExploreSummary) -> Void)?
    public var progressEvery = 100_000

    public init(initial: World, actors: [ExploreActor]) {
        self.initial = initial
        self.actors = actors
    }

    /// Where the run is: the world and each actor's next step.
    struct Position: Hashable {
        var world: World
        var pcs: [Int]
    }

    /// Actors whose next step can run now.
    func enabled(_ p: Position) -> [Int] {
        actors.indices.filter { a in
            p.pcs[a] < actors[a].steps.count && !(actors[a].steps[p.pcs[a]].blocked?(p.world, a) ?? false)
        }
    }

    func finished(_ p: Position) -> Bool { actors.indices.allSatisfy { p.pcs[$0] >= actors[$0].steps.count } }

    /// Runs actor `a`'s next step; returns the trace line and the transition
    /// invariants (no leak, no loss) the step broke. The state invariants are the
    /// caller's: a state reached before needs no second check, an edge does.
    func step(_ p: inout Position, _ a: Int) -> (TraceEntry, [Violation]) {
        let s = actors[a].steps[p.pcs[a]]
        let before = p.world.kernel
        let r = s.run(&p.world, a)
        switch r.next {
        case .advance: p.pcs[a] += 1
        case .step(let i): p.pcs[a] = i
        }
        var broken = r.violations
        if let effect = s.effect { broken += Kernel.transitionViolations(before: before, after: p.world.kernel, effect: effect) }
        return (TraceEntry(actor: actors[a].name, step: s.label, saw: r.saw), broken)
    }

    /// Exhaustive depth-first search over every schedule with at most `preemptionBound`
    /// preemptions (switching away from an actor that could still run). A state is
    /// not explored again when an earlier arrival covers every continuation of this
    /// one: the same last actor with no more preemptions spent, or another last actor
    /// with at least one fewer spent (enough to switch to this one). Stops at the
    /// first violation.
    public func exhaustive(preemptionBound: Int) -> ExploreSummary {
        var summary = ExploreSummary()
        let bound = effectiveStepBound  // once: the search's innermost loop tests it
        /// Per state: the fewest preemptions spent on arriving, by last actor.
        var seen: [Position: [Int: Int]] = [:]
        func covered(_ arrivals: [Int: Int], last: Int, spent: Int) -> Bool {
            arrivals.contains { a, before in a == last ? before <= spent : before + 1 <= spent }
        }
        var schedule: [Int] = []
        var trace: [TraceEntry] = []

        func visit(_ p: Position, last: Int?, spent: Int) -> Bool {
            let ready = enabled(p)
            if ready.isEmpty {
                summary.schedules += 1
                if finished(p) { return false }
                summary.counterexample = Counterexample(schedule: Schedule(schedule), trace: trace, violations: [], livelock: false, deadlock: true)
                return true
            }
            if schedule.count >= bound {
                summary.counterexample = Counterexample(schedule: Schedule(schedule), trace: trace, violations: [], livelock: true)
                return true
            }
            // The running actor first: schedules without preemption come out first.
            let order = last.map { l in ready.contains(l) ? [l] + ready.filter { $0 != l } : ready } ?? ready
            for a in order {
                let cost = (last != nil && a != last && ready.contains(last!)) ? 1 : 0
                if spent + cost > preemptionBound { continue }
                var q = p
                let (entry, broken) = step(&q, a)
                progress(&summary, states: seen.count)
                schedule.append(a)
                trace.append(entry)
                defer {
                    schedule.removeLast()
                    trace.removeLast()
                }
                if !broken.isEmpty {
                    summary.schedules += 1
                    summary.counterexample = shrink(Counterexample(schedule: Schedule(schedule), trace: trace, violations: broken, livelock: false))
                    return true
                }
                if let arrivals = seen[q] {
                    // Reached before, so already checked; explore again only if this
                    // arrival can reach schedules the earlier ones could not.
                    if covered(arrivals, last: a, spent: spent + cost) {
                        summary.schedules += 1
                        continue
                    }
                } else {
                    let violations = invariantCheck(q.world.kernel, p.world.kernel)
                    if !violations.isEmpty {
                        summary.schedules += 1
                        summary.counterexample = shrink(Counterexample(schedule: Schedule(schedule), trace: trace, violations: violations, livelock: false))
                        return true
                    }
                }
                seen[q, default: [:]][a] = spent + cost
                if visit(q, last: a, spent: spent + cost) { return true }
            }
            return false
        }

        let start = Position(world: initial, pcs: actors.map { _ in 0 })
        let violations = start.world.kernel.checkSystemInvariants()
        if !violations.isEmpty {
            summary.counterexample = Counterexample(schedule: Schedule([]), trace: [], violations: violations, livelock: false)
        } else {
            seen[start] = [:]
            _ = visit(start, last: nil, spent: 0)
        }
        summary.states = seen.count
        return summary
    }

    /// `count` schedules picked uniformly at random at each step, from `seed`
    /// (SplitMix64, so a seed names the same schedules on every machine).
    public func random(seed: UInt64, count: Int) -> ExploreSummary {
        var rng = SplitMix64(seed: seed)
        return sample(count: count, start: {}) { ready, _ in ready[Int(rng.next() % UInt64(ready.count))] }
    }

    /// Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): each
    /// schedule gives the actors random distinct priorities and picks `depth - 1`
    /// random change points among the steps; the highest-priority actor that can run
    /// runs, and at the i-th change point the running actor drops to priority i. A bug
    /// that needs `depth` ordering constraints is found with probability at least
    /// 1/(actors * steps^(depth-1)) per schedule.
    public func pct(seed: UInt64, depth: Int, count: Int) -> ExploreSummary {
        var rng = SplitMix64(seed: seed)
        let steps = max(1, actors.reduce(0) { $0 + $1.steps.count })
        var priority: [Int] = []
        var changes: [Int: Int] = [:]
        return sample(count: count, start: {
            // Priorities depth ..< depth + actors, shuffled; change points get 1 ..< depth.
            priority = Array(depth..<(depth + actors.count))
            for i in priority.indices.reversed() where i > 0 { priority.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
            changes = [:]
            for i in 1..<max(1, depth) { changes[Int(rng.next() % UInt64(steps))] = depth - i }
        }) { ready, k in
            let a = ready.max { priority[$0] < priority[$1] }!
            if let low = changes[k] { priority[a] = low }
            return ready.max { priority[$0] < priority[$1] }!
        }
    }

    /// Counts a step and reports progress every `progressEvery` steps.
    func progress(_ summary: inout ExploreSummary, states: Int) {
        summary.steps += 1
        if progressEvery > 0, summary.steps % progressEvery == 0 {
            summary.states = states
            onProgress?(summary)
        }
    }

    /// Runs `count` schedules, each begun with `start()`, choosing at each step with
    /// `pick(enabled actors, step number)`; stops at the first violation or livelock.
    func sample(count: Int, start: () -> Void, pick: ([Int], Int) -> Int) -> ExploreSummary {
        var summary = ExploreSummary()
        var seen: Set<Position> = []
        // Every later check assumes its parent held every invariant: the start first.
        let initialViolations = initial.kernel.checkSystemInvariants()
        if !initialViolations.isEmpty {
            summary.counterexample = Counterexample(schedule: Schedule([]), trace: [], violations: initialViolations, livelock: false)
            return summary
        }
        for _ in 0..<count {
            start()
            var p = Position(world: initial, pcs: actors.map { _ in 0 })
            var schedule: [Int] = []
            var trace: [TraceEntry] = []
            let bound = effectiveStepBound
            func stop(_ c: Counterexample) -> ExploreSummary {
                summary.states = seen.count
                summary.counterexample = c
                return summary
            }
            while true {
                let ready = enabled(p)
                if ready.isEmpty {
                    if finished(p) { break }
                    return stop(Counterexample(schedule: Schedule(schedule), trace: trace, violations: [], livelock: false, deadlock: true))
                }
                if schedule.count >= bound {
                    return stop(Counterexample(schedule: Schedule(schedule), trace: trace, violations: [], livelock: true))
                }
                let a = pick(ready, schedule.count)
                let parent = p.world.kernel
                let (entry, broken) = step(&p, a)
                trace.append(entry)
                schedule.append(a)
                let new = seen.insert(p).inserted
                progress(&summary, states: seen.count)
                // The parent held every invariant: it was checked when first reached.
                let violations = broken + (new ? invariantCheck(p.world.kernel, parent) : [])
                if !violations.isEmpty {
                    summary.schedules += 1
                    return stop(shrink(Counterexample(schedule: Schedule(schedule), trace: trace, violations: violations, livelock: false)))
                }
            }
            summary.schedules += 1
        }
        summary.states = seen.count
        return summary
    }

    /// A shorter schedule with fewer context switches that still breaks an invariant:
    /// drops steps and swaps neighbouring steps of different actors while the replay
    /// still fails, until neither helps. Livelocks are returned as they are.
    ///
    /// - Complexity: O(n²) replays per pass for a schedule of n steps.
    public func shrink(_ c: Counterexample) -> Counterexample {
        guard !c.livelock, !c.deadlock else { return c }
        func switches(_ s: [Int]) -> Int { zip(s, s.dropFirst()).filter { $0 != $1 }.count }
        func fails(_ s: [Int]) -> (trace: [TraceEntry], violations: [Violation])? {
            let r = replay(Schedule(s))
            return r.violations.isEmpty ? nil : (r.trace, r.violations)
        }
        var best = c.schedule.actors
        var bestRun = (trace: c.trace, violations: c.violations)
        // Replay stops at the first violation: anything after it is noise.
        if let r = fails(best) { best = Array(best.prefix(r.trace.count)); bestRun = r }
        var improved = true
        while improved {
            improved = false
            for i in best.indices.reversed() where i < best.count {
                var s = best
                s.remove(at: i)
                if let r = fails(s) {
                    (best, bestRun, improved) = (Array(s.prefix(r.trace.count)), r, true)
                }
            }
            for i in best.indices.dropLast() where best[i] != best[i + 1] {
                var s = best
                s.swapAt(i, i + 1)
                if switches(s) < switches(best), let r = fails(s) {
                    (best, bestRun, improved) = (Array(s.prefix(r.trace.count)), r, true)
                    break
                }
            }
        }
        return Counterexample(schedule: Schedule(best), trace: bestRun.trace, violations: bestRun.violations, livelock: false)
    }

    /// Runs exactly `schedule`, stopping at the first violation; an index that names no
    /// actor, or one with no step left, ends the run with a note in the trace.
    public func replay(_ schedule: Schedule) -> (trace: [TraceEntry], violations: [Violation], world: World) {
        var p = Position(world: initial, pcs: actors.map { _ in 0 })
        var trace: [TraceEntry] = []
        for a in schedule.actors {
            guard actors.indices.contains(a), p.pcs[a] < actors[a].steps.count else {
                trace.append(TraceEntry(actor: "schedule", step: "\(a)", saw: "no such actor, or it has no step left"))
                return (trace, [], p.world)
            }
            if actors[a].steps[p.pcs[a]].blocked?(p.world, a) == true {
                trace.append(TraceEntry(actor: actors[a].name, step: actors[a].steps[p.pcs[a]].label, saw: "blocked: cannot run here"))
                return (trace, [], p.world)
            }
            let (entry, broken) = step(&p, a)
            trace.append(entry)
            let v = broken + p.world.kernel.checkSystemInvariants()
            if !v.isEmpty { return (trace, v, p.world) }
        }
        return (trace, [], p.world)
    }
}

/// SplitMix64: a seed names the same sequence on every machine.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
