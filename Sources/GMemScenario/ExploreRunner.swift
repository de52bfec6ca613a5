import GMemBackend
import GMemModel

/// Builds an `Explorer` from a scenario with actors: the setup steps run once on the
/// model, then each actor's program becomes explorer steps over the resulting world.
/// Scenario steps in a program run atomically (their `expect` fields are ignored: in
/// some interleavings a step rightly fails; the trace shows what it got); a
/// `guest_fault` is two steps split where KVM drops mmu_lock.
public final class ExploreRunner {
    public let scenario: Scenario
    let backend: ModelBackend
    let runner: ScenarioRunner
    /// The setup's failures; exploring a world the setup did not build means little.
    public let setupFailures: [StepReport]
    public private(set) var explorer: Explorer

    public init(_ scenario: Scenario, config: ModelConfig = .mainline) {
        self.scenario = scenario
        backend = ModelBackend(config: config)
        runner = ScenarioRunner(backend: backend)
        var failures: [StepReport] = []
        // The runner runs a scenario's steps; its actors are ours.
        _ = runner.run(scenario) { r in
            if r.status != .passed { failures.append(r) }
        }
        setupFailures = failures
        var world = World(kernel: backend.kernel)
        world.context = AnyHashable(runner.handles)
        explorer = Explorer(initial: world, actors: [])
        explorer.actors = scenario.actors.map(actor)
    }

    func actor(_ spec: ActorSpec) -> ExploreActor {
        var steps: [ExploreStep] = []
        for op in spec.program {
            switch op {
            case .step(let s):
                if case .convert(let fd, let offset, let size, true) = s.op {
                    steps += splitToPrivate(fd, offset: offset, size: size)
                    continue
                }
                steps.append(ExploreStep(s.opName, blocked: hostFaultBlocks(s.op)) { [backend, runner] w, _ in
                    Self.restore(runner, w)
                    backend.kernel = w.kernel
                    let r = runner.run(s)
                    w.kernel = backend.kernel
                    w.context = AnyHashable(runner.handles)
                    return StepResult(Self.describe(r))
                })
            case .guestFault(let vcpu, let gpa, let write):
                steps += ExploreStep.guestFault(at: steps.count, gpa: gpa, write: write) { [runner] w in
                    Self.restore(runner, w)
                    return (try? runner.fd(vcpu))?.raw
                }
            case .gupFastPin(let map, let offset):
                let walk = steps.count
                let done = walk + 3
                steps.append(ExploreStep("GUP-fast \(map)+0x\(String(offset, radix: 16)): walk") { [runner] w, a in
                    Self.restore(runner, w)
                    guard let m = try? runner.mapping(map) else { return StepResult("no mapping '\(map)'", next: .step(done)) }
                    guard let g = w.kernel.gupFastWalk(address: m.address + offset) else {
                        return StepResult("no PTE: GUP-fast falls back to the slow path", next: .step(done))
                    }
                    w.gupFast[a] = g
                    return StepResult("read the PTE without locks")
                })
                steps.append(ExploreStep("GUP-fast \(map)+0x\(String(offset, radix: 16)): grab") { w, a in
                    guard var g = w.gupFast[a] else { return StepResult("nothing walked", next: .step(done)) }
                    if !w.kernel.gupFastGrab(&g) {
                        w.gupFast[a] = nil
                        return StepResult("folio freed: try_grab_folio_fast failed", next: .step(done))
                    }
                    w.gupFast[a] = g
                    return StepResult("pinned the folio the PTE named")
                })
                steps.append(ExploreStep("GUP-fast \(map)+0x\(String(offset, radix: 16)): recheck") { w, a in
                    guard let g = w.gupFast.removeValue(forKey: a) else { return StepResult("nothing grabbed") }
                    guard let id = w.kernel.gupFastRecheck(g) else { return StepResult("PTE changed: unpinned, GUP-fast fails") }
                    w.registers[a] = id
                    return StepResult("recheck passed: pin \(id) stands")
                })
            }
        }
        return ExploreActor(spec.name, steps)
    }

    /// A host access that must fault sleeps while a conversion holds the file's
    /// filemap_invalidate_lock (kvm_gmem_fault_user_mapping() takes it shared).
    func hostFaultBlocks(_ op: Op) -> ((World) -> Bool)? {
        let (map, offset, write): (String, UInt64, Bool)
        switch op {
        case .hostRead(let m, let o, _): (map, offset, write) = (m, o, false)
        case .hostWrite(let m, let o, _): (map, offset, write) = (m, o, true)
        default: return nil
        }
        return { [runner] w in
            Self.restore(runner, w)
            guard let m = try? runner.mapping(map) else { return false }
            return w.kernel.hostFaultWouldBlock(address: m.address + offset, write: write)
        }
    }

    /// In-place to-private in the two steps the explorer can interleave others
    /// between: unmap and refcount check (taking filemap_invalidate_lock), then the
    /// flip (releasing it). Lockless actors (GUP-fast, guest faults) run in between;
    /// host faults on the file wait.
    func splitToPrivate(_ fd: Ref, offset: UInt64, size: UInt64) -> [ExploreStep] {
        [
            ExploreStep("convert to private: unmap, refcount check") { [runner] w, a in
                Self.restore(runner, w)
                guard let f = try? runner.fd(fd) else { return StepResult("no file '\(fd)'", next: .step(Int.max)) }
                let (pending, outcome) = w.kernel.beginToPrivate(f.raw, offset: offset, size: size)
                guard let pending else {
                    let what = outcome.errno.map { "\($0.name) at offset 0x\(String(outcome.errorOffset, radix: 16))" } ?? "nothing to do"
                    return StepResult(what, next: .step(Int.max))
                }
                w.conversions[a] = pending
                return StepResult("checked; filemap_invalidate_lock held")
            },
            ExploreStep("convert to private: flip") { w, a in
                guard let p = w.conversions.removeValue(forKey: a) else { return StepResult("nothing pending") }
                w.kernel.commitToPrivate(p)
                return StepResult("private; lock released")
            },
        ]
    }

    /// Puts the runner's names back as they were on this path.
    static func restore(_ runner: ScenarioRunner, _ w: World) {
        if let h = w.context?.base as? ScenarioRunner.Handles { runner.handles = h }
    }

    static func describe(_ r: StepReport) -> String {
        guard let o = r.observation else { return r.message ?? r.status.rawValue }
        var s = "\(o.result)"
        if let b = o.bytes { s += " bytes " + b.prefix(8).map { String($0, radix: 16) }.joined(separator: " ") }
        if let v = o.value { s += " " + v.rendered }
        return s
    }
}
