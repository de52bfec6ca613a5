import GMemBackend

extension VMType {
    /// kvm_arch_has_private_mem(): the VM can have private memory.
    var hasPrivateMemory: Bool { self != .default }

    /// The access says whether it is private (TDX's shared-GPA bit, SNP's C-bit);
    /// elsewhere KVM decides from the attributes.
    var accessCarriesPrivate: Bool { self == .snp || self == .tdx }

    /// Conversion does not keep contents: the hardware re-keys the page, so what was
    /// there reads as zero afterwards (the model's stand-in for ciphertext).
    var conversionIsLossy: Bool { self == .snp || self == .tdx }
}

/// A memslot's guest_memfd binding (slot->gmem).
struct GmemBinding: Hashable {
    let file: UInt64
    let pgoff: UInt64
    /// slot->gmem.file: nulled when the file is released.
    var fileAlive = true
}

/// struct kvm_memory_slot.
struct Memslot: Hashable {
    /// as_id << 16 | id.
    let slot: UInt32
    var baseGfn: UInt64
    let npages: UInt64
    var flags: UInt32
    let userspaceAddr: UInt64
    var gmem: GmemBinding?
    /// KVM_MEMSLOT_GMEM_ONLY: every fault, shared or private, is served by guest_memfd.
    let gmemOnly: Bool
    /// KVM_MEMSLOT_INVALID: being deleted (only between the explorer's two steps of a
    /// deletion); faults on it retry.
    var invalid = false

    var gfns: Range<UInt64> { baseGfn..<baseGfn + npages }
    var isReadonly: Bool { flags & UAPI.KVM_MEM_READONLY != 0 }
}

/// A stage-2 (TDP) page-table entry.
struct SPTE: Hashable {
    var pfn: UInt64
    var isPrivate: Bool
    var writable: Bool
    /// Installed by the shadow MMU's prefetch from userspace_addr in a GMEM_ONLY slot
    /// (the `shadowPrefetchFromHVA` host bug): hva-backed, so MMU notifiers zap it.
    var prefetchedFromHVA = false
}

/// struct kvm.
struct VM: Hashable {
    let id: UInt64
    let type: VMType
    let conversion: ConversionPolicy
    /// The process whose mm KVM's MMU notifier is registered on (the creator's).
    let mmPID: UInt32
    /// users_count: the VM fd, each vCPU fd and each guest_memfd file.
    var refs = 1
    var memslots: [UInt32: Memslot] = [:]
    /// A memslot was ever created (shadow paging's pre-fault answers differ before).
    var hadMemslot = false
    /// The memslot covering each gfn (address space 0).
    var slotByGfn = RangeMap<UInt32?>(nil)
    /// KVM_SET_MEMORY_ATTRIBUTES state per gfn.
    var attributes = RangeMap<UInt64>(0)
    /// The stage-2 page table, by gfn.
    var spte = PageMap<SPTE>()
    /// mmu_invalidate_seq: bumped by every invalidation.
    var mmuInvalidateSeq: UInt64 = 0
    var vcpus: Set<UInt32> = []
    /// KVM_CAP_EXIT_HYPERCALL: hypercalls forwarded to userspace (bit n = nr n).
    var exitHypercalls: UInt64 = 0

    func isPrivate(gfn: UInt64) -> Bool {
        attributes.value(at: gfn) & UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }
}

extension Kernel {
    // MARK: VMs

    /// KVM_CREATE_VM. `conversion` stands for the host's choice between VM-level
    /// attributes and in-place conversion (a module parameter upstream; per VM here, so
    /// the two can run side by side).
    public mutating func createVM(type: UInt64, conversion: ConversionPolicy = .attributes) throws(Errno) -> Int32 {
        guard type < 64, config.supportedVMTypes & (1 << type) != 0,
            let vmType = VMType.allCases.first(where: { $0.number == type })
        else { throw .EINVAL }
        let id = newID()
        vms[id] = VM(id: id, type: vmType, conversion: conversion, mmPID: currentPID)
        return installFD(.vm(id))
    }

    /// KVM_CREATE_VCPU.
    public mutating func createVCPU(vm fd: Int32, id: UInt32) throws(Errno) -> Int32 {
        let vm = try vmFD(fd)
        // KVM_MAX_VCPU_IDS on x86 is 4096 * 4.
        if id >= config.maxVCPUIDs { throw .EINVAL }  // KVM_MAX_VCPU_IDS
        if vms[vm]!.vcpus.contains(id) { throw .EEXIST }
        vms[vm]!.vcpus.insert(id)
        vms[vm]!.refs += 1
        return installFD(.vcpu(vm: vm, id: id))
    }

    /// kvm_put_kvm(): the VM is destroyed with its last reference, deleting its
    /// memslots. Upstream every guest_memfd file is gone by then (each held a
    /// reference); with memslots holding files, deleting the slots drops theirs.
    mutating func putVM(_ id: UInt64) {
        vms[id]!.refs -= 1
        guard vms[id]!.refs == 0 else { return }
        for slot in vms[id]!.memslots.values.sorted(by: { $0.slot < $1.slot }) { deleteMemslot(vm: id, slot) }
        vms[id] = nil
    }

    /// KVM_CHECK_EXTENSION on /dev/kvm (`fd` nil) or a VM fd, with the values x86
    /// mainline reports for the configured host.
    public func checkExtension(on fd: Int32?, _ cap: Capability) throws(Errno) -> UInt64 {
        var vm: VM?
        if let fd {
            let (_, f) = try file(fd)
            switch f.kind {
            case .vm(let id):
                if vms[id]?.mmPID != currentPID { throw .EIO }
                vm = vms[id]
            case .kvmDevice: vm = nil
            case .vcpu: throw .EINVAL
            case .guestMemfd, .memfd: throw .ENOTTY
            }
        }
        let privateMem = vm.map { $0.type.hasPrivateMemory } ?? true
        switch cap {
        case .userMemory, .userMemory2, .memoryFaultInfo: return 1
        case .guestMemfd: return config.gmemCapOnAnyVM || privateMem ? 1 : 0
        case .readonlyMem: return 1
        case .maxVCPUID: return UInt64(config.maxVCPUIDs)
        case .nrMemslots: return UInt64(UAPI.KVM_USER_MEM_SLOTS)
        case .exitHypercall: return 1 << UAPI.KVM_HC_MAP_GPA_RANGE
        case .memoryAttributes:
            return config.memoryAttributesIoctl && privateMem ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0
        case .vmTypes: return config.supportedVMTypes
        case .preFaultMemory: return config.tdp ? 1 : 0
        case .guestMemfdFlags: return config.gmemFlags ? gmemSupportedFlags(vm: vm?.id) : 0  // unknown to 6.12
        case .guestMemfdMemoryAttributes:
            guard config.inPlaceConversion, privateMem else { return 0 }
            return (vm.map { $0.conversion == .inPlace } ?? true) ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0
        }
    }

    /// KVM_ENABLE_CAP on a VM. Only KVM_CAP_EXIT_HYPERCALL is enableable here: its
    /// argument must be a subset of the forwardable hypercalls (KVM_HC_MAP_GPA_RANGE).
    public mutating func enableCap(vm fd: Int32, _ cap: Capability, _ arg: UInt64) throws(Errno) {
        let vm = try vmFD(fd)
        guard cap == .exitHypercall else { throw .EINVAL }
        if arg & ~(1 << UAPI.KVM_HC_MAP_GPA_RANGE) != 0 { throw .EINVAL }
        vms[vm]!.exitHypercalls = arg
    }

    /// Whether the vCPU's VM forwards KVM_HC_MAP_GPA_RANGE to userspace.
    public func exitsOnMapGPARange(vcpu fd: Int32) throws(Errno) -> Bool {
        let (vm, _) = try vcpuFD(fd)
        return vms[vm]!.exitHypercalls & (1 << UAPI.KVM_HC_MAP_GPA_RANGE) != 0
    }

    // MARK: Stage-2 zaps

    /// Zaps the SPTEs of `gfns` (kvm_unmap_gfn_range): both shared and private, since
    /// only VMs with mirrored page tables (TDX) zap one side at a time.
    /// `invalidation`: inside an mmu_invalidate range (punch, conversion, attributes,
    /// release), which moves mmu_invalidate_seq so racing faults retry; a memslot
    /// flush (kvm_mmu_zap_memslot()) is not one: SRCU keeps faults out of it instead.
    mutating func zapGfns(vm: UInt64, _ gfns: Range<UInt64>, invalidation: Bool = true) {
        guard !gfns.isEmpty else { return }
        if invalidation { vms[vm]!.mmuInvalidateSeq += 1 }
        for gfn in vms[vm]!.spte.keys(in: gfns) {
            vms[vm]!.spte[gfn] = nil
            counters.spteZapped += 1
        }
    }

    /// Zaps what memslot `slot` maps for guest_memfd page offsets `pgoffs`.
    mutating func zapGmemBinding(vm: UInt64, slot: UInt32, pgoffs: Range<UInt64>) {
        guard let s = vms[vm]?.memslots[slot], let g = s.gmem else { return }
        let lo = max(pgoffs.lowerBound, g.pgoff)
        let hi = min(pgoffs.upperBound, g.pgoff + s.npages)
        guard lo < hi else { return }
        zapGfns(vm: vm, (s.baseGfn + lo - g.pgoff)..<(s.baseGfn + hi - g.pgoff))
    }

    /// The MMU notifier's invalidate_range_start for process `pid`: every VM created
    /// by that process zaps the shared SPTEs that map host virtual pages `vpns`
    /// through a memslot's userspace_addr.
    mutating func mmuNotifierInvalidate(pid: UInt32, _ vpns: Range<UInt64>) {
        iotlbInvalidate(pid: pid, vpns)
        for id in vms.keys where vms[id]!.mmPID == pid {
            var zaps: [Range<UInt64>] = []
            let prefetchBug = config.shadowPrefetchFromHVA
            for (_, s) in vms[id]!.memslots where !s.gmemOnly || prefetchBug {
                let first = s.userspaceAddr >> UAPI.pageShift
                let lo = max(first, vpns.lowerBound)
                let hi = min(first + s.npages, vpns.upperBound)
                if lo < hi { zaps.append((s.baseGfn + lo - first)..<(s.baseGfn + hi - first)) }
            }
            for gfns in zaps {
                vms[id]!.mmuInvalidateSeq += 1
                // The entries present, not every gfn: the cost is what is mapped.
                for gfn in vms[id]!.spte.keys(in: gfns)
                where vms[id]!.spte[gfn].map({ !$0.isPrivate && ($0.prefetchedFromHVA || !gmemOnlyGfn(vm: id, gfn: gfn)) }) == true {
                    vms[id]!.spte[gfn] = nil
                    counters.spteZapped += 1
                }
            }
        }
    }

    // MARK: Memory attributes

    /// KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes).
    public mutating func setMemoryAttributes(vm fd: Int32, address: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(Errno)
    {
        let vm = try vmFD(fd)
        guard config.memoryAttributesIoctl else { throw .ENOTTY }
        slotsLock(vm)  // kvm_vm_set_mem_attributes()
        // With in-place conversion PRIVATE lives in the guest_memfd, not in the VM.
        let supported = vms[vm]!.type.hasPrivateMemory && vms[vm]!.conversion == .attributes
            ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0
        if flags != 0 { throw .EINVAL }
        if attributes & ~supported != 0 { throw .EINVAL }
        if size == 0 || address.addingReportingOverflow(size).overflow { throw .EINVAL }
        if address & (UAPI.pageSize - 1) != 0 || size & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let gfns = (address >> UAPI.pageShift)..<((address + size) >> UAPI.pageShift)
        // Nothing to do when the whole range already has the value.
        if vms[vm]!.attributes.allEqual(in: gfns, to: attributes) { return }
        // kvm_arch_pre_set_memory_attributes(): unmap the old side first.
        if !config.mutants.contains(.skipAttributeZap) { zapGfns(vm: vm, gfns) }
        vms[vm]!.attributes.set(gfns, to: attributes)
        counters.conversionsDone += 1
    }
}
