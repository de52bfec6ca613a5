import GMemBackend

/// How a stage-2 fault ended when it did not produce a page.
enum FaultExit: Error, Hashable {
    /// kvm_prepare_memory_fault_exit() and KVM_RUN returns -1 with this errno.
    case memoryFault(Errno, flags: UInt64, gfn: UInt64)
    /// The access is emulated as MMIO (no memslot, or a write to a read-only slot).
    case emulate(gfn: UInt64)
    /// A pre-fault found no memslot (RET_PF_EMULATE maps to ENOENT there).
    case failed(Errno)
    /// RET_PF_RETRY on a memslot being deleted: KVM_RUN re-enters the guest and
    /// faults again until the deletion is done (`Kernel.wouldWait`).
    case retry
}

extension Kernel {
    /// The vCPU's view of `gfn`: the frame its stage-2 maps, faulting it in through
    /// kvm_mmu_faultin_pfn() when the table has no usable entry.
    mutating func stage2Page(vm: UInt64, gfn: UInt64, write: Bool, isPrivate requested: Bool?) throws(FaultExit)
        -> UInt64
    {
        if let pfn = stage2Hit(vm: vm, gfn: gfn, write: write, isPrivate: requested) { return pfn }
        let spte = try stage2Resolve(vm: vm, gfn: gfn, write: write, isPrivate: requested)
        vms[vm]!.spte[gfn] = spte
        if config.shadowPrefetchFromHVA && !spte.isPrivate { prefetchFromUserspace(vm: vm, around: gfn) }
        return spte.pfn
    }

    /// Whether `gfn` lies in a GMEM_ONLY memslot.
    func gmemOnlyGfn(vm: UInt64, gfn: UInt64) -> Bool {
        vms[vm]!.slotByGfn.value(at: gfn).flatMap { vms[vm]!.memslots[$0]?.gmemOnly } ?? false
    }

    /// The shadow MMU's prefetch as measured on kvm-pvm hosts (a kernel bug there: it
    /// bypasses guest_memfd in GMEM_ONLY slots), direct_pte_prefetch() exactly: in the
    /// faulting gfn's aligned block of 8 (PTE_PREFETCH_NUM), each run of gfns without an
    /// entry is one batch; a batch whose memslot does not hold all of it, or whose first
    /// host page GUP-fast (FOLL_WRITE: a present, writable PTE, not secretmem) cannot take, ends the
    /// prefetch; otherwise its pages up to the first such one are mapped, read-only.
    mutating func prefetchFromUserspace(vm: UInt64, around gfn: UInt64) {
        let block = (gfn & ~7)..<((gfn & ~7) + 8)
        let mm = processes[vms[vm]!.mmPID]?.mm
        var start = block.lowerBound
        while start < block.upperBound {
            guard start != gfn && vms[vm]!.spte[start] == nil else {
                start += 1
                continue
            }
            var end = start
            while end < block.upperBound && end != gfn && vms[vm]!.spte[end] == nil { end += 1 }
            guard let id = vms[vm]!.slotByGfn.value(at: start), let slot = vms[vm]!.memslots[id],
                slot.baseGfn + slot.npages - start >= end - start
            else { return }
            var g = start
            func vpn(_ g: UInt64) -> UInt64 { (slot.userspaceAddr >> UAPI.pageShift) &+ (g - slot.baseGfn) }
            // GUP-fast takes a present, writable PTE, and never memory outside the direct map.
            while g < end, let pte = mm?.ptes[vpn(g)], pte.writable, !isOutsideDirectMapIn(pid: vms[vm]!.mmPID, vpn(g)) {
                vms[vm]!.spte[g] = SPTE(pfn: pte.pfn, isPrivate: false, writable: false, prefetchedFromHVA: true)
                g += 1
            }
            if g == start { return }
            start = end
        }
    }

    /// The hardware walk hits; no fault, so no KVM check runs. Where the access
    /// carries private/shared (a shared-GPA bit), the two sides are different
    /// translations: an SPTE serves only accesses of its own side.
    func stage2Hit(vm: UInt64, gfn: UInt64, write: Bool, isPrivate requested: Bool?) -> UInt64? {
        guard let spte = vms[vm]!.spte[gfn], spte.writable || !write, requested.map({ $0 == spte.isPrivate }) ?? true
        else { return nil }
        return spte.pfn
    }

    /// The part of a fault that runs without mmu_lock (kvm_mmu_faultin_pfn()): decide
    /// the side, find the memslot, get the frame. Returns the SPTE to install.
    mutating func stage2Resolve(vm: UInt64, gfn: UInt64, write: Bool, isPrivate requested: Bool?) throws(FaultExit)
        -> SPTE
    {
        let attrPrivate = kvmMemIsPrivate(vm: vm, gfn: gfn)
        let isPrivate = requested ?? attrPrivate
        let flags = isPrivate ? UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE : 0
        // KVM exits rather than retrying: retrying would hang SNP and TDX guests.
        if isPrivate != attrPrivate { throw .memoryFault(.EFAULT, flags: flags, gfn: gfn) }

        guard let slotID = vms[vm]!.slotByGfn.value(at: gfn), let slot = vms[vm]!.memslots[slotID] else {
            // kvm_handle_noslot_fault(): private accesses cannot be emulated MMIO.
            if isPrivate { throw .memoryFault(.EFAULT, flags: flags, gfn: gfn) }
            throw .emulate(gfn: gfn)
        }
        // The memslot is being deleted: retry until it is gone.
        if slot.invalid {
            wouldWait = true
            throw .retry
        }
        let pfn: UInt64
        var writable = true
        if isPrivate || slot.gmemOnly {
            pfn = try gmemFaultinPFN(vm: vm, slot: slot, gfn: gfn, flags: flags)
        } else {
            // A write to a read-only slot is emulated (KVM_PFN_ERR_RO_FAULT).
            if write && slot.isReadonly { throw .emulate(gfn: gfn) }
            let vpn = (slot.userspaceAddr >> UAPI.pageShift) + (gfn - slot.baseGfn)
            // KVM reaches userspace_addr with GUP, which secretmem refuses.
            if isOutsideDirectMap(vpn) { throw .failed(.EFAULT) }
            // hva_to_pfn(): GUP-fast (FOLL_WRITE) takes a page whose PTE is present and
            // writable whatever the VMA says; the slow path's check_vma_flags() wants
            // VM_READ for a read fault, so a write-only or exec-only VMA is EFAULT there.
            if !write, let vma = mm.vmas.value(at: vpn), !vma.prot.contains(.read), mm.ptes[vpn]?.writable != true {
                throw .failed(.EFAULT)
            }
            do {
                pfn = try hostFault(vpn: vpn, write: write)
            } catch {
                // GUP failed: kvm_handle_error_pfn() returns -EFAULT without filling in
                // a memory-fault exit (measured: exit_reason stays 0). Only
                // guest_memfd and private/shared mismatches report one.
                throw .failed(.EFAULT)
            }
            writable = !slot.isReadonly && (mm.ptes[vpn]?.writable ?? false)
        }
        return SPTE(pfn: pfn, isPrivate: isPrivate, writable: writable)
    }

    /// What a guest access that stopped on `error` returns from KVM_RUN.
    static func outcome(of error: FaultExit, address: UInt64, isWrite: Bool) -> GuestOutcome {
        switch error {
        case .memoryFault(let errno, let flags, let gfn):
            .failed(errno, .memoryFault(flags: flags, gpa: gfn << UAPI.pageShift, size: UAPI.pageSize))
        case .emulate:
            .exit(.mmio(gpa: address, length: 1, isWrite: isWrite))
        case .failed(let errno):
            .failed(errno, nil)
        case .retry:
            // Only a trial run sees this (the step waits instead).
            .failed(.EAGAIN, nil)
        }
    }

    /// The type of the VM a vCPU fd belongs to.
    public func vmType(ofVCPU fd: Int32) -> VMType? {
        guard let (vm, _) = try? vcpuFD(fd) else { return nil }
        return vms[vm]?.type
    }

    /// kvm_mem_is_private(): the VM's attribute, or with in-place conversion the
    /// shareability of the guest_memfd page bound at `gfn` (shared where none is).
    func kvmMemIsPrivate(vm: UInt64, gfn: UInt64) -> Bool {
        guard vms[vm]!.conversion == .inPlace else { return vms[vm]!.isPrivate(gfn: gfn) }
        guard let slotID = vms[vm]!.slotByGfn.value(at: gfn), let slot = vms[vm]!.memslots[slotID],
            let binding = slot.gmem, binding.fileAlive, let file = gmemFiles[binding.file]
        else { return false }
        return gmemInodes[file.inode]!.privatePages.value(at: binding.pgoff + gfn - slot.baseGfn)
    }

    /// kvm_mmu_faultin_pfn_gmem() + kvm_gmem_get_pfn().
    mutating func gmemFaultinPFN(vm: UInt64, slot: Memslot, gfn: UInt64, flags: UInt64) throws(FaultExit) -> UInt64 {
        guard let binding = slot.gmem else { throw .memoryFault(.EFAULT, flags: flags, gfn: gfn) }
        // The file was released (slot->gmem.file is NULL) or is being released
        // (kvm_gmem_get_file() fails once its refcount is zero).
        guard binding.fileAlive, let g = gmemFiles[binding.file], !g.dying else {
            throw .memoryFault(.EFAULT, flags: flags, gfn: gfn)
        }
        let pgoff = binding.pgoff + (gfn - slot.baseGfn)
        if g.bindings.value(at: pgoff) != slot.slot { throw .memoryFault(.EIO, flags: flags, gfn: gfn) }
        do {
            return try gmemGetFolio(g.inode, pgoff: pgoff)
        } catch {
            throw .memoryFault(error, flags: flags, gfn: gfn)
        }
    }

    /// One guest access by a vCPU: KVM_RUN until the access completes or exits.
    /// Pages are touched in order; an exit on a later page leaves earlier writes done,
    /// as a real copy loop would.
    public mutating func guestAccess(vcpu fd: Int32, _ access: GuestAccess) throws(Errno) -> GuestOutcome {
        let (vm, _) = try vcpuFD(fd)
        let write: [UInt8]?
        let count: UInt64
        switch access.kind {
        case .read(let n): (write, count) = (nil, n)
        case .write(let bytes): (write, count) = (bytes, UInt64(bytes.count))
        }
        if access.gpa.addingReportingOverflow(count).overflow { return .exit(.shutdown) }
        var out: [UInt8] = []
        if write == nil { out.reserveCapacity(Int(min(count, 1 << 30))) }
        for c in PageChunks(start: access.gpa, count: count) {
            let pfn: UInt64
            do {
                pfn = try stage2Page(vm: vm, gfn: c.page, write: write != nil, isPrivate: access.isPrivate)
            } catch {
                return Self.outcome(of: error, address: c.address, isWrite: write != nil)
            }
            if let write {
                phys.write(pfn, offset: c.offsetInPage, write[c.range])
            } else {
                phys.read(pfn, offset: c.offsetInPage, count: c.length, into: &out)
            }
        }
        return .completed(out)
    }

    /// KVM_PRE_FAULT_MEMORY: maps the range as a read fault would, page by page.
    /// Returns the range not yet done; succeeds if at least one page was mapped.
    /// The most bytes one KVM_PRE_FAULT_MEMORY call maps in the model (2^20 pages).
    static let maxPreFaultBytes: UInt64 = 1 << 32

    public mutating func preFaultMemory(vcpu fd: Int32, gpa: UInt64, size: UInt64, flags: UInt64) throws(Errno)
        -> (gpa: UInt64, size: UInt64)
    {
        let (vm, _) = try vcpuFD(fd)
        if flags != 0 { throw .EINVAL }
        if gpa & (UAPI.pageSize - 1) != 0 || size & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let (end, overflow) = gpa.addingReportingOverflow(size)
        if overflow || end <= gpa { throw .EINVAL }
        // Shadow paging faults on GVAs; pre-faulting GPAs needs TDP. Loading the
        // shadow MMU's roots fails first while the VM has never had a memslot
        // (measured on kvm-pvm hosts: ENOSPC; once one was created, even if deleted
        // since, EOPNOTSUPP).
        guard config.tdp else { throw vms[vm]!.hadMemslot ? .EOPNOTSUPP : .ENOSPC }
        var cursor = gpa
        // At most this many pages a call, as if a signal came: the caller sees the
        // progress and calls again (the kernel stops the same way on a signal).
        let stop = end - gpa > Self.maxPreFaultBytes ? gpa + Self.maxPreFaultBytes : end
        while cursor < stop {
            let gfn = cursor >> UAPI.pageShift
            do throws(FaultExit) {
                // A memslot being deleted or moved: EAGAIN, as pre-faulting does not
                // promise KVM_RUN's forward progress.
                if let id = vms[vm]!.slotByGfn.value(at: gfn), vms[vm]!.memslots[id]?.invalid == true { throw .failed(.EAGAIN) }
                if vms[vm]!.spte[gfn] == nil {
                    _ = try stage2Page(vm: vm, gfn: gfn, write: false, isPrivate: nil)
                }
            } catch {
                let errno: Errno
                switch error {
                case .memoryFault(let e, _, _): errno = e
                case .emulate: errno = .ENOENT
                case .failed(let e): errno = e
                case .retry: errno = .EAGAIN
                }
                if cursor == gpa { throw errno }
                break
            }
            cursor += UAPI.pageSize
        }
        return (cursor, end - cursor)
    }
}
