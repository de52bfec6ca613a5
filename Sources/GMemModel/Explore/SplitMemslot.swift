import GMemBackend

/// A memslot deletion paused where kvm_swap_active_memslots() waits
/// (synchronize_srcu) for the vCPUs that looked the old memslot up.
public struct PendingMemslotDelete: Hashable, Sendable {
    public let vm: UInt64
    let slot: UInt32
}

extension Kernel {
    /// KVM_SET_USER_MEMORY_REGION2 that deletes a memslot, first step
    /// (kvm_invalidate_memslot()): under slots_lock, the same checks, then the slot
    /// is marked KVM_MEMSLOT_INVALID and made active, so new faults on it retry.
    /// Anything other than a deletion runs whole and returns nil.
    public mutating func beginSetUserMemoryRegion2(vm fd: Int32, _ mem: UserMemoryRegion2) throws(Errno) -> PendingMemslotDelete? {
        guard mem.memorySize == 0 else {
            try setUserMemoryRegion2(vm: fd, mem)
            return nil
        }
        let vm = try vmFD(fd)
        try checkMemoryRegionFlags(mem.flags)
        slotsLock(vm)
        try checkMemoryRegion(mem)
        guard vms[vm]!.memslots[mem.slot] != nil else { throw .EINVAL }
        vms[vm]!.memslots[mem.slot]!.invalid = true
        return PendingMemslotDelete(vm: vm, slot: mem.slot)
    }

    /// Second step, once no vCPU is inside a fault that looked the old slot up: flush
    /// its stage-2 mappings (kvm_arch_flush_shadow_memslot()), free it, unbind its
    /// guest_memfd; slots_lock is released.
    public mutating func finishMemslotDelete(_ p: PendingMemslotDelete) {
        guard let slot = vms[p.vm]?.memslots[p.slot] else { return }
        deleteMemslot(vm: p.vm, slot)
    }
}
