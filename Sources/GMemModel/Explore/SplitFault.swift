import GMemBackend

/// A guest fault paused between kvm_mmu_faultin_pfn(), which runs without mmu_lock,
/// and the SPTE install under it: the window the explorer interleaves other actors in.
public struct PendingFault: Hashable, Sendable {
    let vm: UInt64
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
