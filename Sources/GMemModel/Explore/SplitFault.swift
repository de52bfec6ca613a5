import GMemBackend

/// A guest fault paused between kvm_mmu_faultin_pfn(), which runs without mmu_lock,
/// and the SPTE install under it: the window the explorer interleaves other actors in.
public struct PendingFault: Hashable, Sendable {
    /// The VM: the fault is an SRCU reader of its memslots until it installs.
    public let vm: UInt64
    let gfn: UInt64
    let spte: SPTE
    /// mmu_invalidate_seq as the fault read it before resolving (fault->mmu_seq).
    let seq: UInt64
    public var gpa: UInt64 { gfn << UAPI.pageShift }
}

/// How the first half of a fault ended.
public enum FaultStart: Hashable, Sendable {
    /// The SPTE was already there: no fault.
    case mapped(pfn: UInt64)
    /// Resolved; the install is the next step.
    case pending(PendingFault)
    /// KVM_RUN returned (memory-fault exit, MMIO, EFAULT) before any install.
    case stopped(GuestOutcome)
}

extension Kernel {
    /// The first half of a stage-2 fault by `vcpu` at `gpa`: read mmu_invalidate_seq,
    /// then resolve the frame without mmu_lock (kvm_faultin_pfn()).
    public mutating func startFault(vcpu fd: Int32, gpa: UInt64, write: Bool, isPrivate: Bool? = nil) throws(Errno)
        -> FaultStart
    {
        let (vm, _) = try vcpuFD(fd)
        let gfn = gpa >> UAPI.pageShift
        if let pfn = stage2Hit(vm: vm, gfn: gfn, write: write, isPrivate: isPrivate) { return .mapped(pfn: pfn) }
        let seq = vms[vm]!.mmuInvalidateSeq
        do {
            let spte = try stage2Resolve(vm: vm, gfn: gfn, write: write, isPrivate: isPrivate)
            return .pending(PendingFault(vm: vm, gfn: gfn, spte: spte, seq: seq))
        } catch {
            return .stopped(Self.outcome(of: error, address: gpa, isWrite: write))
        }
    }

    /// The second half: under mmu_lock, is_page_fault_stale() sends the fault back
    /// (RET_PF_RETRY) if an invalidation ran since it read the sequence count;
    /// otherwise the SPTE goes in. Returns whether it did.
    public mutating func finishFault(_ f: PendingFault) -> Bool {
        guard vms[f.vm] != nil else { return false }
        if !config.mutants.contains(.skipFaultRetry) && vms[f.vm]!.mmuInvalidateSeq != f.seq { return false }
        vms[f.vm]!.spte[f.gfn] = f.spte
        return true
    }
}

extension ExploreStep {
    /// A stage-2 fault as two explorer steps, the first at index `at` of its actor:
    /// resolve (then skip the install if the SPTE was present or KVM_RUN stopped) and
    /// install, which sends the actor back to resolve on RET_PF_RETRY. `vcpu` finds the
    /// vCPU fd when the step runs.
    public static func guestFault(at: Int, gpa: UInt64, write: Bool, vcpu: @escaping (World) -> Int32?) -> [ExploreStep] {
        let after = at + 2
        let where_ = "fault 0x\(String(gpa, radix: 16))"
        return [
            ExploreStep("\(where_): resolve", blocked: { w, _ in
                // A fault on a memslot being deleted retries until the deletion is
                // done; one through a guest_memfd mapping a conversion locked waits.
                guard let fd = vcpu(w) else { return false }
                return w.kernel.waits { _ = try? $0.startFault(vcpu: fd, gpa: gpa, write: write) }
            }) { w, a in
                guard let fd = vcpu(w) else { return StepResult("no such vCPU", next: .step(after)) }
                switch Result(catching: { () throws(Errno) in try w.kernel.startFault(vcpu: fd, gpa: gpa, write: write) }) {
                case .success(.pending(let f)):
                    w.pending[a] = f
                    return StepResult("resolved, mmu_invalidate_seq read")
                case .success(.mapped(let pfn)):
                    return StepResult("SPTE present (pfn 0x\(String(pfn, radix: 16))): no fault", next: .step(after))
                case .success(.stopped(let o)):
                    return StepResult("KVM_RUN stopped: \(o)", next: .step(after))
                case .failure(let e):
                    return StepResult("\(e.name)", next: .step(after))
                }
            },
            ExploreStep("\(where_): install") { w, a in
                guard let f = w.pending.removeValue(forKey: a) else { return StepResult("nothing to install") }
                return w.kernel.finishFault(f) ? StepResult("SPTE installed") : StepResult("stale: RET_PF_RETRY", next: .step(at))
            },
        ]
    }
}
