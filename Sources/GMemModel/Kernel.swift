import GMemBackend

/// What the model's host kernel is configured to offer, so one model can stand for
/// mainline x86 with TDP or for a specific host the kernel backend runs on.
public struct ModelConfig: Hashable, Sendable {
    /// VM types KVM_CREATE_VM accepts (bit n = type n); KVM_CAP_VM_TYPES.
    public var supportedVMTypes: UInt64
    /// CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: KVM_SET_MEMORY_ATTRIBUTES exists at all.
    public var memoryAttributesIoctl: Bool
    /// Two-dimensional paging (TDP); without it KVM_PRE_FAULT_MEMORY is EOPNOTSUPP.
    public var tdp: Bool
    /// The largest guest physical address bit KVM maps (kvm_mmu_max_gfn).
    public var maxPhysAddrBits: UInt64
    /// Memslot address spaces (2 with SMM).
    public var addressSpaces: UInt32
    /// In-place conversion on guest_memfd (the post-6.18 series) can be chosen per VM.
    public var inPlaceConversion: Bool = true
    /// Deliberate bugs switched on (for showing that checks catch them); empty for
    /// the shipped model.
    public var mutants: Set<Mutant> = []
    /// Who holds whom between guest_memfd files and VMs.
    public var bindingOwnership: BindingOwnership = .fileHoldsVM
    /// GUEST_MEMFD_FLAG_NO_DIRECT_MAP is offered (not in 6.18: see `.next`).
    public var noDirectMap = false
    /// GUEST_MEMFD_FLAG_MMAP and INIT_SHARED, and KVM_CAP_GUEST_MEMFD_FLAGS, exist
    /// (6.18); 6.12 has neither (any flag is EINVAL, and a guest_memfd has no mmap).
    public var gmemFlags = true
    /// KVM_CAP_GUEST_MEMFD is 1 on any VM (6.18); 6.12 says 1 only on VMs with
    /// private memory (KVM_CREATE_GUEST_MEMFD works on a default VM all the same).
    public var gmemCapOnAnyVM = true
    /// Linux 6.18's kvm_gmem_bind() bug: offset + size is a signed loff_t sum that can
    /// wrap negative and pass the EOF check (mainline takes the offset unsigned).
    public var bindOffsetWraps = false
    /// The shadow MMU's prefetch maps a GMEM_ONLY slot's neighbouring gfns from
    /// userspace_addr (measured on kvm-pvm hosts; a kernel bug: it bypasses guest_memfd).
    public var shadowPrefetchFromHVA = false
    /// What private writable mappings may commit (the overcommit heuristic's RAM +
    /// swap), in bytes; UInt64.max with overcommit_memory = 1.
    public var commitLimit: UInt64 = 64 << 30
    /// KVM_MAX_VCPU_IDS (KVM_CAP_MAX_VCPU_ID): 4 x CONFIG_KVM_MAX_NR_VCPUS on x86.
    public var maxVCPUIDs: UInt32 = 16384
    /// The most bytes one step may return; larger results are refused (not a kernel
    /// limit: the model's, so no input can exhaust memory).
    public var transferLimit: UInt64 = Limits.defaultTransfer

    /// Mainline plus the in-flight series this model implements beyond it
    /// (NO_DIRECT_MAP).
    public static let next: ModelConfig = {
        var c = ModelConfig.mainline
        c.noDirectMap = true
        return c
    }()

    /// Mainline x86-64 (6.18 guest_memfd semantics) with TDP and
    /// CONFIG_KVM_SW_PROTECTED_VM: `default` and `sw_protected` VMs, and the model's
    /// TDX- and SNP-like platforms (`snp`, `tdx`).
    public static let mainline = ModelConfig(
        supportedVMTypes: 0b11_0011, memoryAttributesIoctl: true, tdp: true, maxPhysAddrBits: 52,
        addressSpaces: 1)

    /// Mainline standing for the kernel `profile` describes: its VM types, memory
    /// attributes, paging mode, in-place conversion and vCPU id limit.
    public static func standing(for profile: HostProfile) -> ModelConfig {
        var c = ModelConfig.mainline
        c.supportedVMTypes = profile.vmTypes
        c.memoryAttributesIoctl = profile.memoryAttributes
        c.tdp = profile.tdp
        c.inPlaceConversion = profile.inPlace
        c.maxVCPUIDs = profile.maxVCPUIDs
        c.commitLimit = profile.commitLimit
        c.bindOffsetWraps = profile.bindOffsetWraps
        c.shadowPrefetchFromHVA = profile.shadowPrefetchFromHVA
        c.gmemFlags = profile.gmemFlags
        c.gmemCapOnAnyVM = profile.gmemFlags  // the two arrived together (6.18)
        return c
    }

    /// Linux 6.12 LTS (the reference kernel under qemu: kvm_amd with NPT and
    /// CONFIG_KVM_SW_PROTECTED_VM), as measured there: no MMAP or INIT_SHARED flags,
    /// no KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_GUEST_MEMFD only on VMs with private
    /// memory, no in-place conversion; memory attributes, sw_protected VMs and
    /// KVM_PRE_FAULT_MEMORY as mainline.
    public static let linux612: ModelConfig = {
        var c = ModelConfig.mainline
        c.supportedVMTypes = 0b11
        c.inPlaceConversion = false
        c.gmemFlags = false
        c.gmemCapOnAnyVM = false
        return c
    }()

    /// The hosts this project runs on (reference/host-kernel-probe.md): 6.18 with
    /// kvm-pvm, shadow paging, default VMs only, no memory attributes.
    public static let pvmHost = ModelConfig(
        supportedVMTypes: 0b1, memoryAttributesIoctl: false, tdp: false, maxPhysAddrBits: 52,
        addressSpaces: 1, inPlaceConversion: false, bindOffsetWraps: true, shadowPrefetchFromHVA: true,
        maxVCPUIDs: 4096)
}

/// What the system did, counted: the policy comparison's columns.
public struct Stats: Hashable, Sendable {
    public var conversionsDone = 0
    public var conversionsRefused = 0
    public var spteZapped = 0
    public var iommuEntriesZapped = 0
    public var vmasCreated = 0
    public var pagesZeroed = 0
    public var pagesCopied = 0
}

/// What an open file description is.
enum FileKind: Hashable {
    case kvmDevice
    case vm(UInt64)
    case vcpu(vm: UInt64, id: UInt32)
    /// A guest_memfd file; its VM (if bound yet) is in `gmemFiles`.
    case guestMemfd(inode: UInt64)
    case memfd(inode: UInt64)
}

/// struct file: shared by every fd and VMA that refers to it.
struct OpenFile: Hashable {
    var kind: FileKind
    /// fds, VMAs and other holders of the file.
    var refs: Int
    /// f_pos, for files with a position (memfd).
    var position: UInt64 = 0
}

/// The model's host: the process that drives KVM (its fd table and address space),
/// the KVM module, guest_memfd inodes, shmem and physical memory.
///
/// A value type: copying a `Kernel` snapshots the whole system, which is what the
/// explorer does before each step it may have to undo.
public struct Kernel: Hashable {
    public internal(set) var config: ModelConfig
    var phys = PhysicalMemory()
    var files: [UInt64: OpenFile] = [:]
    var vms: [UInt64: VM] = [:]
    var gmemInodes: [UInt64: GmemInode] = [:]
    /// guest_memfd file state (struct gmem_file), by file id.
    var gmemFiles: [UInt64: GmemFile] = [:]
    var shmemInodes: [UInt64: ShmemInode] = [:]
    /// Host processes by pid. Pid 1 is the VMM that drives KVM; fork adds more.
    var processes: [UInt32: Process] = [1: Process()]
    /// The process that issues the next call.
    public internal(set) var currentPID: UInt32 = 1
    /// GUP pins held by processes: the frames each pin holds.
    var pins: [UInt64: Pin] = [:]
    /// IOMMU domains.
    var iommuDomains: [UInt64: IOMMUDomain] = [:]
    /// Counters for the policy comparison (pages zeroed and copied live in `phys`).
    @Bookkeeping var counters = Stats()
    /// Set when a call reached a point where the kernel would wait for an operation
    /// the explorer paused: a filemap_invalidate_lock it holds, or a memslot it is
    /// deleting (a vCPU's fault retries until the deletion is done). The explorer
    /// runs a step on a copy to learn this, and counts the step as blocked.
    @Bookkeeping public internal(set) var wouldWait = false
    /// Why the last call was refused with `Errno.modelLimit`: the limit it would
    /// exceed, named so the user can raise it.
    @Bookkeeping var refusal: String? = nil
    public var stats: Stats {
        var s = counters
        s.pagesZeroed = phys.pagesZeroed
        s.pagesCopied = phys.pagesCopied
        return s
    }
    /// The pKVM-style hypervisor's view of (its own) physical pages.
    public internal(set) var pkvm = PKVM(pages: 64)
    /// GUP-fast references between their walk and their recheck.
    var speculativeRefs: [UInt64: SpeculativeRef] = [:]
    var nextID: UInt64 = 1

    public init(config: ModelConfig = .mainline) {
        self.config = config
    }

    /// Refuses the current call for exceeding a model limit; `why` names the limit.
    mutating func refuse(_ why: String) -> Errno {
        refusal = why
        return .modelLimit
    }

    /// Refuses a transfer of `count` bytes over the transfer limit.
    mutating func checkTransfer(_ count: UInt64, _ what: String) throws(Errno) {
        if let why = Limits.transferRefusal(count, limit: config.transferLimit, what: what) { throw refuse(why) }
    }

    /// The current process's fd table.
    var fds: [Int32: UInt64] {
        get { processes[currentPID]!.fds }
        _modify { yield &processes[currentPID]!.fds }
    }

    /// No descriptor below this one is free in the current process.
    var nextFD: Int32 {
        get { processes[currentPID]!.nextFD }
        _modify { yield &processes[currentPID]!.nextFD }
    }

    /// The current process's address space.
    var mm: AddressSpace {
        get { processes[currentPID]!.mm }
        _modify { yield &processes[currentPID]!.mm }
    }

    mutating func newID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }

    // MARK: File descriptors

    /// Installs a new file at the lowest free descriptor (as get_unused_fd_flags does).
    mutating func installFD(_ kind: FileKind) -> Int32 {
        let fileID = newID()
        files[fileID] = OpenFile(kind: kind, refs: 1)
        var fd = nextFD
        while fds[fd] != nil { fd += 1 }
        fds[fd] = fileID
        nextFD = fd + 1
        return fd
    }

    /// fget(): the file behind `fd`, or EBADF.
    func file(_ fd: Int32) throws(Errno) -> (id: UInt64, file: OpenFile) {
        guard let id = fds[fd], let f = files[id] else { throw .EBADF }
        return (id, f)
    }

    /// close(2).
    public mutating func close(_ fd: Int32) throws(Errno) {
        guard let id = fds.removeValue(forKey: fd) else { throw .EBADF }
        nextFD = min(nextFD, fd)
        putFile(id)
    }

    mutating func getFile(_ id: UInt64) {
        files[id]!.refs += 1
    }

    /// fput(): drops a reference and releases the file at zero.
    mutating func putFile(_ id: UInt64) {
        files[id]!.refs -= 1
        guard files[id]!.refs == 0 else { return }
        let kind = files.removeValue(forKey: id)!.kind
        switch kind {
        case .kvmDevice:
            break
        case .vm(let vm), .vcpu(let vm, _):
            putVM(vm)
        case .guestMemfd:
            gmemRelease(file: id)
        case .memfd(let inode):
            shmemPut(inode)
        }
    }

    /// The VM behind a VM fd; `ioctlOnOther` is the errno an ioctl of the VM class gets
    /// on any other kind of file.
    func vmFD(_ fd: Int32) throws(Errno) -> UInt64 {
        let (_, f) = try file(fd)
        switch f.kind {
        case .vm(let id):
            // kvm_vm_ioctl(): only the creator's mm may drive the VM, before any argument check.
            if vms[id]?.mmPID != currentPID { throw .EIO }
            return id
        case .kvmDevice, .vcpu: throw .EINVAL  // kvm_dev_ioctl / kvm_vcpu_ioctl default
        case .guestMemfd, .memfd: throw .ENOTTY  // no unlocked_ioctl
        }
    }

    /// The vCPU behind a vCPU fd. A vCPU ioctl on a VM fd reaches kvm_arch_vm_ioctl()'s
    /// default (ENOTTY); on /dev/kvm, kvm_arch_dev_ioctl()'s (EINVAL).
    func vcpuFD(_ fd: Int32) throws(Errno) -> (vm: UInt64, id: UInt32) {
        let (_, f) = try file(fd)
        switch f.kind {
        case .vcpu(let vm, let id):
            if vms[vm]?.mmPID != currentPID { throw .EIO }  // kvm_vcpu_ioctl()
            return (vm, id)
        case .vm(let id):
            if vms[id]?.mmPID != currentPID { throw .EIO }
            throw .ENOTTY
        case .kvmDevice: throw .EINVAL
        case .guestMemfd, .memfd: throw .ENOTTY
        }
    }

    // MARK: Invariants

    /// Checks the model's internal bookkeeping; traps on a violation. For tests.
    public func checkInvariants() {
        for (_, id) in fds { precondition(files[id] != nil, "fd points at a released file") }
        for (id, f) in files {
            precondition(f.refs > 0, "file \(id) with no references")
            if case .vm(let vm) = f.kind { precondition(vms[vm] != nil, "VM fd outlives its VM") }
        }
        for (_, g) in gmemFiles {
            precondition(gmemInodes[g.inode] != nil, "gmem file outlives its inode")
            if config.bindingOwnership == .fileHoldsVM, let vm = g.vm {
                precondition(vms[vm] != nil, "gmem file does not hold its VM")
            }
        }
        for (_, vm) in vms {
            vm.attributes.checkInvariants()
            vm.slotByGfn.checkInvariants()
        }
        for (_, inode) in gmemInodes {
            inode.state.checkInvariants()
            for (_, pfn) in inode.folios { precondition(phys.contains(pfn), "page cache holds a freed frame") }
        }
        for (_, p) in processes { p.mm.vmas.checkInvariants() }
        // Every pin holds its frames; pin counts add up.
        var pinned: [UInt64: Int32] = [:]
        for (_, p) in pins {
            for pfn in p.pfns {
                precondition(phys.contains(pfn), "a pin outlives its frame")
                pinned[pfn, default: 0] += 1
            }
        }
        for (pfn, frame) in phys.frames {
            precondition(frame.pincount == pinned[pfn] ?? 0, "pin count of frame \(pfn) disagrees with the pins held")
            precondition(frame.refcount > 0 && frame.mapcount >= 0, "frame \(pfn) has impossible counts")
        }
    }
}
