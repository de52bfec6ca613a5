import GMemBackend

extension Kernel {
    /// KVM_SET_USER_MEMORY_REGION2: kvm_set_memory_region() and, for guest_memfd
    /// slots, kvm_gmem_bind(), with every check in the kernel's order.
    public mutating func setUserMemoryRegion2(vm fd: Int32, _ mem: UserMemoryRegion2) throws(Errno) {
        let vm = try vmFD(fd)
        try checkMemoryRegionFlags(mem.flags)
        try setMemoryRegion(vm: vm, mem)
    }

    /// KVM_SET_USER_MEMORY_REGION (v1): only LOG_DIRTY_PAGES and READONLY exist.
    public mutating func setUserMemoryRegion(vm fd: Int32, _ mem: UserMemoryRegion2) throws(Errno) {
        let vm = try vmFD(fd)
        if mem.flags & ~(UAPI.KVM_MEM_LOG_DIRTY_PAGES | UAPI.KVM_MEM_READONLY) != 0 { throw .EINVAL }
        var v1 = mem
        v1.guestMemfd = 0
        v1.guestMemfdOffset = 0
        try checkMemoryRegionFlags(v1.flags)
        try setMemoryRegion(vm: vm, v1)
    }

    /// check_memory_region_flags(): GUEST_MEMFD excludes LOG_DIRTY_PAGES (no dirty
    /// logging of private memory) and READONLY (read-only slots emulate writes as
    /// MMIO, which private memory cannot have).
    func checkMemoryRegionFlags(_ flags: UInt32) throws(Errno) {
        var valid = UAPI.KVM_MEM_LOG_DIRTY_PAGES | UAPI.KVM_MEM_GUEST_MEMFD
        if flags & UAPI.KVM_MEM_GUEST_MEMFD != 0 {
            valid &= ~UAPI.KVM_MEM_LOG_DIRTY_PAGES
        } else {
            valid |= UAPI.KVM_MEM_READONLY
        }
        if flags & ~valid != 0 { throw .EINVAL }
    }

    mutating func setMemoryRegion(vm: UInt64, _ mem: UserMemoryRegion2) throws(Errno) {
        let isGmem = mem.flags & UAPI.KVM_MEM_GUEST_MEMFD != 0
        slotsLock(vm)
        try checkMemoryRegion(mem)

        let old = vms[vm]!.memslots[mem.slot]
        if mem.memorySize == 0 {
            guard let old else { throw .EINVAL }
            deleteMemslot(vm: vm, old)
            return
        }

        let baseGfn = mem.guestPhysAddr >> UAPI.pageShift
        let npages = mem.memorySize >> UAPI.pageShift
        var isMove = true
        if let old {
            // Private memslots are immutable: they can only be deleted.
            if isGmem { throw .EINVAL }
            if mem.userspaceAddr != old.userspaceAddr || npages != old.npages
                || (mem.flags ^ old.flags) & (UAPI.KVM_MEM_READONLY | UAPI.KVM_MEM_GUEST_MEMFD) != 0
            {
                throw .EINVAL
            }
            if baseGfn == old.baseGfn {
                if mem.flags == old.flags { return }  // nothing to change
                isMove = false
            }
        }
        if isMove, overlapsOtherSlot(vm: vm, slot: mem.slot, baseGfn..<baseGfn + npages) { throw .EEXIST }

        var binding: GmemBinding?
        var gmemOnly = false
        if isGmem {
            (binding, gmemOnly) = try gmemBindChecks(vm: vm, fd: mem.guestMemfd, offset: mem.guestMemfdOffset, npages: npages)
        }
        // kvm_arch_prepare_memory_region(): the slot must fit under the largest gfn.
        if isMove && baseGfn + npages - 1 > (1 << (config.maxPhysAddrBits - UAPI.pageShift)) - 1 {
            throw .EINVAL
        }
        if let old {
            // A move or flags-only change of an ordinary slot.
            unmapMemslot(vm: vm, old)
            var moved = old
            moved.baseGfn = baseGfn
            moved.flags = mem.flags
            insertMemslot(vm: vm, moved)
            return
        }
        let slot = Memslot(
            slot: mem.slot, baseGfn: baseGfn, npages: npages, flags: mem.flags,
            userspaceAddr: mem.userspaceAddr, gmem: binding, gmemOnly: gmemOnly)
        if let binding {
            invalidateLock(gmemFiles[binding.file]!.inode, exclusive: true)  // kvm_gmem_bind()
            gmemFiles[binding.file]!.bindings.set(binding.pgoff..<binding.pgoff + npages, to: mem.slot)
            if config.bindingOwnership == .memslotHoldsFile {
                // The memslot holds the file; the file is this VM's from now on.
                gmemFiles[binding.file]!.vm = vm
                getFile(binding.file)
            }
        }
        insertMemslot(vm: vm, slot)
    }

    /// kvm_set_memory_region()'s general sanity checks, in its order.
    func checkMemoryRegion(_ mem: UserMemoryRegion2) throws(Errno) {
        let page = UAPI.pageSize - 1
        let isGmem = mem.flags & UAPI.KVM_MEM_GUEST_MEMFD != 0
        if mem.memorySize & page != 0 { throw .EINVAL }
        if mem.guestPhysAddr & page != 0 { throw .EINVAL }
        if mem.userspaceAddr & page != 0 || !accessOK(mem.userspaceAddr, mem.memorySize) { throw .EINVAL }
        if isGmem
            && (mem.guestMemfdOffset & page != 0
                || mem.guestMemfdOffset.addingReportingOverflow(mem.memorySize).overflow)
        {
            throw .EINVAL
        }
        let asID = mem.slot >> 16
        let id = mem.slot & 0xffff
        if asID >= config.addressSpaces || id >= UAPI.KVM_USER_MEM_SLOTS { throw .EINVAL }
        if mem.guestPhysAddr.addingReportingOverflow(mem.memorySize).overflow { throw .EINVAL }
        if mem.memorySize >> UAPI.pageShift > UAPI.KVM_MEM_MAX_NR_PAGES { throw .EINVAL }
    }

    /// mutex_lock(&kvm->slots_lock): only a memslot deletion the explorer paused holds
    /// it across calls, so taking it only notes when the caller would wait.
    mutating func slotsLock(_ vm: UInt64) {
        if vms[vm]?.memslots.values.contains(where: \.invalid) == true { wouldWait = true }
    }

    /// access_ok() on x86-64: the range lies below the user address limit.
    func accessOK(_ address: UInt64, _ size: UInt64) -> Bool {
        let (end, overflow) = address.addingReportingOverflow(size)
        return !overflow && end <= UAPI.TASK_SIZE_MAX
    }

    func overlapsOtherSlot(vm: UInt64, slot: UInt32, _ gfns: Range<UInt64>) -> Bool {
        vms[vm]!.slotByGfn.firstIndex(in: gfns, where: { $0 != nil && $0 != slot }) != nil
    }

    /// kvm_gmem_bind()'s checks: EBADF for no file, EINVAL for anything that is not
    /// this VM's guest_memfd, an offset outside the file, or a range already bound.
    func gmemBindChecks(vm: UInt64, fd: UInt32, offset: UInt64, npages: UInt64) throws(Errno)
        -> (GmemBinding, Bool)
    {
        guard fd <= UInt32(Int32.max), let fileID = fds[Int32(fd)], let f = files[fileID] else { throw .EBADF }
        guard case .guestMemfd(let ino) = f.kind else { throw .EINVAL }
        // Upstream the file was made for one VM; the alternative binds it at first bind.
        if let owner = gmemFiles[fileID]!.vm, owner != vm { throw .EINVAL }
        let inode = gmemInodes[ino]!
        let size = npages << UAPI.pageShift
        if Int64(bitPattern: offset) < 0 || offset & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let (end, overflow) = offset.addingReportingOverflow(size)
        if config.bindOffsetWraps {
            // Linux 6.18 (a kernel bug): offset + size is computed as a signed loff_t, so
            // an offset near 2^63 wraps negative, passes the EOF check, and binds pages
            // past EOF that the guest can then read and write.
            if Int64(bitPattern: offset) &+ Int64(bitPattern: size) > Int64(bitPattern: inode.size) { throw .EINVAL }
        } else if overflow || end > inode.size {
            throw .EINVAL
        }
        let start = offset >> UAPI.pageShift
        if gmemFiles[fileID]!.bindings.firstIndex(in: start..<start + npages, where: { $0 != nil }) != nil {
            throw .EINVAL
        }
        // KVM_MEMSLOT_GMEM_ONLY: the file can be mapped, or in-place conversion is on.
        return (GmemBinding(file: fileID, pgoff: start), inode.supportsMmap || inode.inPlace)
    }

    mutating func insertMemslot(vm: UInt64, _ slot: Memslot) {
        vms[vm]!.memslots[slot.slot] = slot
        vms[vm]!.hadMemslot = true
        vms[vm]!.slotByGfn.set(slot.gfns, to: slot.slot)
    }

    /// Removes a slot's gfns and flushes its stage-2 mappings
    /// (kvm_arch_flush_shadow_memslot).
    mutating func unmapMemslot(vm: UInt64, _ slot: Memslot) {
        zapGfns(vm: vm, slot.gfns, invalidation: false)
        vms[vm]!.slotByGfn.set(slot.gfns, to: nil)
        vms[vm]!.memslots[slot.slot] = nil
    }

    /// KVM_MR_DELETE: flush, then kvm_gmem_unbind(): a no-op once the file is
    /// released (slot->gmem.file is NULL), but a file being released still loses the
    /// binding, since kvm_gmem_release() may run only after the memslot is freed.
    mutating func deleteMemslot(vm: UInt64, _ slot: Memslot) {
        unmapMemslot(vm: vm, slot)
        if let g = slot.gmem, g.fileAlive {
            // Before the fix (6.18-rc), unbind returned when kvm_gmem_get_file() failed.
            if config.mutants.contains(.unbindSkipsDyingFile) && gmemFiles[g.file]!.dying { return }
            // A dying file's bindings are removed without its lock (release waits on slots_lock).
            if !gmemFiles[g.file]!.dying { invalidateLock(gmemFiles[g.file]!.inode, exclusive: true) }
            gmemFiles[g.file]!.bindings.set(g.pgoff..<g.pgoff + slot.npages, to: nil)
            if config.mutants.contains(.unbindDiscards) { truncateGmemPages(gmemFiles[g.file]!.inode, g.pgoff..<g.pgoff + slot.npages) }
            if config.bindingOwnership == .memslotHoldsFile { putFile(g.file) }
        }
    }
}
