import GMemBackend
import GMemModel

/// Builds an `Explorer` from a scenario: the setup steps run once on the model, then
/// each actor's program becomes explorer steps over the resulting world. Scenario
/// steps run whole (their `expect` fields are ignored: in some interleavings a step
/// rightly fails; the trace shows what it got) and wait while they would sleep on a
/// lock a paused operation holds, except the operations the kernel itself performs
/// in pieces, which are split where it drops a lock or takes none: a `guest_fault`
/// (mmu_lock), `pin_user_pages_fast` (lockless), in-place to-private and hypervisor
/// IOMMU maps (filemap_invalidate_lock), memslot deletion (SRCU), the last close
/// (fput before kvm_gmem_release()).
public final class ExploreRunner {
    public let scenario: Scenario
    let backend: ModelBackend
    let runner: ScenarioRunner
    /// The setup's failures; exploring a world the setup did not build means little.
    public let setupFailures: [StepReport]
    /// Why the modelled host cannot run this file (a feature it `requires`), or nil.
    public let skipReason: String?
    public private(set) var explorer: Explorer

    /// A file without actors is explored as one actor running its steps (one
    /// schedule, every invariant checked after every step); a file with actors runs
    /// its steps once as the setup and interleaves the actors.
    public init(_ scenario: Scenario, config: ModelConfig = .mainline) {
        self.scenario = scenario
        backend = ModelBackend(config: config)
        runner = ScenarioRunner(backend: backend)
        skipReason = ScenarioRunner.lacking(scenario, on: [backend])
        var setup = scenario
        let program = scenario.actors.isEmpty ? [ActorSpec(name: "steps", program: scenario.steps.map { .step($0) })] : scenario.actors
        if scenario.actors.isEmpty { setup.steps = [] }
        var failures: [StepReport] = []
        // The runner runs a scenario's steps (and applies its policies); actors are ours.
        _ = runner.run(setup) { r in
            if r.status != .passed { failures.append(r) }
        }
        setupFailures = skipReason == nil ? failures : []
        // From here on each actor step reports the no-leak and no-loss violations it caused.
        backend.checkTransitions = true
        var world = World(kernel: backend.kernel)
        world.context = AnyHashable(runner.handles)
        explorer = Explorer(initial: world, actors: [])
        explorer.actors = program.map(actor)
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
                if case .close(let ref) = s.op {
                    steps += splitClose(ref, at: steps.count)
                    continue
                }
                if case .setUserMemoryRegion(let vm, let spec, true) = s.op, spec.size == 0 {
                    steps += splitMemslotDelete(s, vm: vm, spec: spec, at: steps.count)
                    continue
                }
                if case .iommuMap(let domain, let iova, nil, let fd?, let offset, let length) = s.op {
                    steps += splitIOMMUMap(s, domain: domain, iova: iova, fd: fd, offset: offset, length: length, at: steps.count)
                    continue
                }
                steps.append(atomic(s))
            case .guestFault(let vcpu, let gpa, let write):
                steps += ExploreStep.guestFault(at: steps.count, gpa: gpa, write: write) { [runner] w in
                    Self.restore(runner, w)
                    return (try? runner.fd(vcpu))?.raw
                }
            case .gupFastPin(let map, let offset):
                steps += gupFastPin(map, offset: offset, at: steps.count)
            }
        }
        return ExploreActor(spec.name, steps)
    }

    /// pin_user_pages_fast(FOLL_WRITE) of one page: GUP-fast's lockless walk, grab
    /// and recheck, and the slow path it falls back to whenever one of them fails
    /// (under mmap_lock, so atomic against fork; it faults, so it waits on a
    /// conversion's filemap_invalidate_lock).
    func gupFastPin(_ map: String, offset: UInt64, at walk: Int) -> [ExploreStep] {
        let slow = walk + 3
        let done = walk + 4
        let what = "GUP-fast \(map)+0x\(String(offset, radix: 16))"
        return [
            ExploreStep("\(what): walk") { [runner] w, a in
                Self.restore(runner, w)
                guard let m = try? runner.mapping(map) else { return StepResult("no mapping '\(map)'", next: .step(done)) }
                guard let g = w.kernel.gupFastWalk(address: m.address + offset, write: true) else {
                    return StepResult("no writable PTE: fall back to the slow path", next: .step(slow))
                }
                w.gupFast[a] = g
                return StepResult("read the PTE without locks")
            },
            ExploreStep("\(what): grab") { w, a in
                guard var g = w.gupFast[a] else { return StepResult("nothing walked", next: .step(slow)) }
                if !w.kernel.gupFastGrab(&g) {
                    w.gupFast[a] = nil
                    return StepResult("folio freed: try_grab_folio_fast failed; slow path", next: .step(slow))
                }
                w.gupFast[a] = g
                return StepResult("pinned the folio the PTE named")
            },
            ExploreStep("\(what): recheck") { w, a in
                guard let g = w.gupFast.removeValue(forKey: a) else { return StepResult("nothing grabbed", next: .step(slow)) }
                guard let id = w.kernel.gupFastRecheck(g) else { return StepResult("PTE changed: unpinned; slow path") }
                w.registers[a] = id
                return StepResult("recheck passed: pin \(id) stands", next: .step(done))
            },
            ExploreStep("\(what): slow path", blocked: { [runner] w, _ in
                Self.restore(runner, w)
                guard let m = try? runner.mapping(map) else { return false }
                return w.kernel.waits { _ = try? $0.pin(address: m.address + offset, length: UAPI.pageSize, longterm: false) }
            }) { [runner] w, a in
                Self.restore(runner, w)
                guard let m = try? runner.mapping(map) else { return StepResult("no mapping '\(map)'") }
                do throws(Errno) {
                    let id = try w.kernel.pin(address: m.address + offset, length: UAPI.pageSize, longterm: false)
                    w.registers[a] = id
                    return StepResult("faulted in and pinned: pin \(id)")
                } catch {
                    return StepResult("\(error.name): nothing pinned")
                }
            },
        ]
    }

    /// A scenario step run whole, reporting the no-leak and no-loss violations the
    /// backend saw across it.
    func atomic(_ s: Step) -> ExploreStep {
        ExploreStep(s.opName, effect: nil, blocked: { [backend, runner] w, _ in
            w.kernel.waits { k in
                Self.restore(runner, w)
                backend.kernel = k
                _ = runner.run(s)
                k = backend.kernel
                _ = backend.takeTransitionViolations()
                Self.restore(runner, w)
            }
        }) { [backend, runner] w, _ in
            Self.restore(runner, w)
            backend.kernel = w.kernel
            _ = backend.takeTransitionViolations()
            let r = runner.run(s)
            w.kernel = backend.kernel
            w.context = AnyHashable(runner.handles)
            return StepResult(Self.describe(r), violations: backend.takeTransitionViolations())
        }
    }

    /// A hypervisor-managed IOMMU map of guest_memfd pages in the two steps a
    /// conversion could run between if the map did not hold filemap_invalidate_lock:
    /// the ownership check, then the install. Other domains' maps run whole.
    func splitIOMMUMap(_ s: Step, domain: String, iova: UInt64, fd: Ref, offset: UInt64, length: UInt64, at: Int) -> [ExploreStep] {
        let done = at + 2
        let whole = atomic(s)
        return [
            ExploreStep("iommu_map: check shared", effect: nil, blocked: { [runner] w, _ in
                Self.restore(runner, w)
                guard let d = try? runner.domain(domain), let f = try? runner.fd(fd) else { return false }
                return w.kernel.waits { _ = try? $0.beginIOMMUMap(domain: d.id, iova: iova, fd: f.raw, offset: offset, length: length) }
            }) { [runner] w, a in
                Self.restore(runner, w)
                guard let d = try? runner.domain(domain), w.kernel.iommuModel(ofDomain: d.id) == .hypervisor, let f = try? runner.fd(fd) else {
                    let r = whole.run(&w, a)
                    return StepResult(r.saw, next: .step(done), violations: r.violations)
                }
                do throws(Errno) {
                    w.iommuMaps[a] = try w.kernel.beginIOMMUMap(domain: d.id, iova: iova, fd: f.raw, offset: offset, length: length)
                    return StepResult("pages shared; filemap_invalidate_lock held shared")
                } catch {
                    return StepResult(error.name, next: .step(done))
                }
            },
            ExploreStep("iommu_map: install") { w, a in
                guard let p = w.iommuMaps.removeValue(forKey: a) else { return StepResult("nothing to install") }
                do throws(Errno) {
                    try w.kernel.commitIOMMUMap(p)
                    return StepResult("mapped; lock released")
                } catch {
                    return StepResult(error.name)
                }
            },
        ]
    }

    /// In-place to-private in the two steps the explorer can interleave others
    /// between: unmap and refcount check (taking filemap_invalidate_lock), then the
    /// flip (releasing it). Lockless actors (GUP-fast, guest faults) run in between;
    /// host faults on the file wait.
    func splitToPrivate(_ fd: Ref, offset: UInt64, size: UInt64) -> [ExploreStep] {
        [
            ExploreStep("convert to private: unmap, refcount check", blocked: { [runner] w, _ in
                Self.restore(runner, w)
                guard let f = try? runner.fd(fd) else { return false }
                return w.kernel.waits { _ = $0.beginToPrivate(f.raw, offset: offset, size: size) }
            }) { [runner] w, a in
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

    /// close(2) in the two steps memslot updates can run between: the last fput (the
    /// file is dying), then kvm_gmem_release() under slots_lock.
    func splitClose(_ ref: Ref, at: Int) -> [ExploreStep] {
        let done = at + 2
        return [
            ExploreStep("close: fput") { [runner] w, a in
                Self.restore(runner, w)
                guard let f = try? runner.fd(ref) else { return StepResult("no file '\(ref)'", next: .step(done)) }
                let r = Result { () throws(Errno) in try w.kernel.closeDeferringRelease(f.raw) }
                if case .name(let n) = ref {
                    // A closed name stays resolvable, to an fd that is never valid.
                    var h = runner.handles
                    h.fds[n] = FD(-1)
                    runner.handles = h
                    w.context = AnyHashable(h)
                }
                switch r {
                case .failure(let e): return StepResult(e.name, next: .step(done))
                case .success(nil): return StepResult("closed", next: .step(done))
                case .success(let p?):
                    w.releases[a] = p
                    return StepResult("last reference dropped: the file is dying")
                }
            },
            ExploreStep("close: kvm_gmem_release", blocked: { w, a in
                guard let p = w.releases[a] else { return false }
                return w.kernel.waits { $0.finishRelease(p) }
            }) { w, a in
                guard let p = w.releases.removeValue(forKey: a) else { return StepResult("nothing to release") }
                w.kernel.finishRelease(p)
                return StepResult("bindings dropped, SPTEs zapped")
            },
        ]
    }

    /// Deleting a memslot in the two steps vCPUs can run between: mark it invalid
    /// (faults on it retry), then, once no fault that looked it up is in flight
    /// (synchronize_srcu), flush, free and unbind it. slots_lock is held across.
    func splitMemslotDelete(_ s: Step, vm: Ref, spec: RegionSpec, at: Int) -> [ExploreStep] {
        let done = at + 2
        let region: (ScenarioRunner) throws(ScenarioRunner.Skip) -> UserMemoryRegion2 = { r throws(ScenarioRunner.Skip) in
            var m = UserMemoryRegion2(slot: spec.slot, flags: spec.flags, guestPhysAddr: spec.gpa, memorySize: 0,
                                      userspaceAddr: try r.address(spec.userspaceAddr), guestMemfdOffset: spec.guestMemfdOffset)
            if let g = spec.guestMemfd { m.guestMemfd = UInt32(bitPattern: try r.fd(g).raw) }
            return m
        }
        return [
            ExploreStep("KVM_MR_DELETE: mark the memslot invalid", blocked: { [runner] w, _ in
                Self.restore(runner, w)
                guard let f = try? runner.fd(vm), let m = try? region(runner) else { return false }
                return w.kernel.waits { _ = try? $0.beginSetUserMemoryRegion2(vm: f.raw, m) }
            }) { [runner] w, a in
                Self.restore(runner, w)
                guard let f = try? runner.fd(vm), let m = try? region(runner) else { return StepResult("no VM '\(vm)'", next: .step(done)) }
                do throws(Errno) {
                    guard let p = try w.kernel.beginSetUserMemoryRegion2(vm: f.raw, m) else { return StepResult("ok", next: .step(done)) }
                    w.memslotDeletes[a] = p
                    return StepResult("KVM_MEMSLOT_INVALID; slots_lock held")
                } catch {
                    return StepResult(error.name, next: .step(done))
                }
            },
            ExploreStep("KVM_MR_DELETE: synchronize_srcu, flush, free, unbind", blocked: { w, a in
                // kvm_swap_active_memslots() waits for every vCPU inside a fault.
                guard let p = w.memslotDeletes[a], !w.kernel.config.mutants.contains(.memslotDeleteSkipsSRCUWait) else { return false }
                return w.pending.values.contains { $0.vm == p.vm }
            }) { w, a in
                guard let p = w.memslotDeletes.removeValue(forKey: a) else { return StepResult("nothing to delete") }
                w.kernel.finishMemslotDelete(p)
                return StepResult("deleted; slots_lock released")
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
