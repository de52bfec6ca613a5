/// A file descriptor in the process that drives the backend.
public struct FD: Hashable, Sendable, CustomStringConvertible {
    public var raw: Int32
    public init(_ raw: Int32) { self.raw = raw }
    public var description: String { "fd \(raw)" }
}

/// A host mapping returned by mmap(2): its start address and length.
public struct Mapping: Hashable, Sendable {
    public var address: UInt64
    public var length: UInt64
    public init(address: UInt64, length: UInt64) {
        self.address = address
        self.length = length
    }
}

/// mmap(2) protection bits. The corresponding C constants are `PROT_READ`, `PROT_WRITE`,
/// `PROT_EXEC`.
public struct Protection: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let read = Protection(rawValue: 1)
    public static let write = Protection(rawValue: 2)
    public static let exec = Protection(rawValue: 4)
}

/// What fstat(2) reports that scenarios look at.
public struct FileStat: Hashable, Sendable {
    public var size: UInt64
    public var blksize: UInt64
    public var blocks: UInt64
    public var inode: UInt64
    public init(size: UInt64, blksize: UInt64, blocks: UInt64, inode: UInt64) {
        self.size = size
        self.blksize = blksize
        self.blocks = blocks
        self.inode = inode
    }
}

/// struct kvm_userspace_memory_region2, minus the padding KVM ignores.
public struct UserMemoryRegion2: Hashable, Sendable {
    /// as_id << 16 | slot id, as in the uapi.
    public var slot: UInt32
    public var flags: UInt32
    public var guestPhysAddr: UInt64
    public var memorySize: UInt64
    public var userspaceAddr: UInt64
    public var guestMemfdOffset: UInt64
    /// The raw fd number; KVM only looks at it when KVM_MEM_GUEST_MEMFD is set.
    public var guestMemfd: UInt32

    public init(
        slot: UInt32, flags: UInt32, guestPhysAddr: UInt64, memorySize: UInt64,
        userspaceAddr: UInt64, guestMemfdOffset: UInt64 = 0, guestMemfd: UInt32 = 0
    ) {
        self.slot = slot
        self.flags = flags
        self.guestPhysAddr = guestPhysAddr
        self.memorySize = memorySize
        self.userspaceAddr = userspaceAddr
        self.guestMemfdOffset = guestMemfdOffset
        self.guestMemfd = guestMemfd
    }
}

/// The outcome of a host load or store through a mapping.
public enum HostAccess: Hashable, Sendable {
    /// The access completed; a load returns the bytes it read.
    case completed([UInt8])
    /// The access raised SIGBUS at `address` (bytes before it were accessed).
    case sigbus(address: UInt64)
    /// The access raised SIGSEGV at `address`: no mapping, or the wrong protection.
    case sigsegv(address: UInt64)
}

/// A KVM exit that stopped a guest access.
public enum VMExit: Hashable, Sendable {
    /// KVM_EXIT_MEMORY_FAULT (39); KVM_RUN failed with EFAULT or EHWPOISON.
    case memoryFault(flags: UInt64, gpa: UInt64, size: UInt64)
    /// KVM_EXIT_MMIO (6): no memslot, or a write to a read-only memslot.
    case mmio(gpa: UInt64, length: UInt32, isWrite: Bool)
    /// KVM_EXIT_SHUTDOWN (8).
    case shutdown
    /// KVM_EXIT_INTERNAL_ERROR (17).
    case internalError(suberror: UInt32)
    /// KVM_EXIT_HYPERCALL (3).
    case hypercall(nr: UInt64, args: [UInt64])
    /// Any other exit reason, by number.
    case other(reason: UInt32)

    public var reasonName: String {
        switch self {
        case .memoryFault: "memory_fault"
        case .mmio: "mmio"
        case .shutdown: "shutdown"
        case .internalError: "internal_error"
        case .hypercall: "hypercall"
        case .other(let r): "exit_\(r)"
        }
    }
}

/// One access by a vCPU to guest physical memory.
public struct GuestAccess: Hashable, Sendable {
    public enum Kind: Hashable, Sendable {
        case read(count: UInt64)
        case write([UInt8])
    }
    public var gpa: UInt64
    public var kind: Kind
    /// Set only where the platform lets the access choose (a shared-GPA bit);
    /// on `default` and `sw_protected` VMs KVM decides from the memory attributes.
    public var isPrivate: Bool?

    public init(gpa: UInt64, kind: Kind, isPrivate: Bool? = nil) {
        self.gpa = gpa
        self.kind = kind
        self.isPrivate = isPrivate
    }
}

/// How KVM_RUN ended for a guest access.
public enum GuestOutcome: Hashable, Sendable {
    /// The access completed: the bytes read, or empty for a write.
    case completed([UInt8])
    /// KVM_RUN returned 0 with an exit the access could not pass (MMIO, shutdown).
    case exit(VMExit)
    /// KVM_RUN returned -1 with this errno; for EFAULT and EHWPOISON, with the
    /// memory-fault exit KVM filled in.
    case failed(Errno, VMExit?)
}

/// Why a backend did not perform an operation.
public enum BackendError: Error, Hashable, Sendable {
    /// The operation ran and the kernel (or the model) returned this errno.
    case errno(Errno)
    /// The backend cannot perform this operation here; the reason says why.
    /// Scenario runs report such a step as skipped, never as passed.
    case unsupported(String)
}

/// How a VM converts memory between shared and private: a policy chosen per VM.
public enum ConversionPolicy: String, CaseIterable, Hashable, Sendable {
    /// x86 mainline: VM-level KVM_SET_MEMORY_ATTRIBUTES selects, per gfn, the
    /// guest_memfd page (private) or the userspace_addr page (shared). Two pages per
    /// GPA; conversion is lossy.
    case attributes
    /// The in-place series (KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd): one page
    /// per offset whose shareability changes; to-private is refused with EAGAIN while
    /// anything on the host still holds the page.
    case inPlace = "in_place"
}

/// The answer to an in-place conversion (KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd).
public struct ConversionOutcome: Hashable, Sendable {
    /// nil on success, else the ioctl's errno.
    public var errno: Errno?
    /// kvm_memory_attributes2.error_offset: with EAGAIN, the offset of the first page
    /// that is still in use.
    public var errorOffset: UInt64
    public init(errno: Errno?, errorOffset: UInt64) {
        self.errno = errno
        self.errorOffset = errorOffset
    }
}

/// Something a backend made and a later call refers to: a GUP pin, a GUP-fast
/// reference, an IOMMU domain, a pKVM guest.
public struct ObjectHandle: Hashable, Sendable {
    public var id: UInt64
    public init(id: UInt64) { self.id = id }
}

/// A broken invariant: which one, the page, who can reach it, and what is wrong.
public struct Violation: Hashable, Sendable, CustomStringConvertible {
    public enum Invariant: String, Hashable, Sendable {
        /// A private page is reachable by host userspace (mapped, pinned) or another VM.
        case isolation
        /// A stage-2 entry points at a page the backing store no longer holds there.
        case coherence
        /// A binding, mapping or pin outlives what it refers to.
        case lifetime
        /// A page leaving private state kept its contents where they must be zeroed.
        case noLeak = "no_leak"
        /// An operation that preserves contents lost or changed them.
        case noLoss = "no_loss"
    }
    public var invariant: Invariant
    public var page: String
    public var parties: [String]
    public var detail: String
    public var description: String {
        "\(invariant.rawValue): \(page): \(detail) [\(parties.joined(separator: ", "))]"
    }
    public init(invariant: Invariant, page: String, parties: [String], detail: String) {
        self.invariant = invariant
        self.page = page
        self.parties = parties
        self.detail = detail
    }
}

/// Host features a scenario can require (its top-level `requires`). A backend that
/// lacks one skips the scenario, saying why.
public enum Feature: String, CaseIterable, Sendable {
    /// KVM_CREATE_VM accepts KVM_X86_SW_PROTECTED_VM.
    case swProtected = "sw_protected"
    /// KVM_SET_MEMORY_ATTRIBUTES exists and supports PRIVATE.
    case memoryAttributes = "memory_attributes"
    /// KVM_PRE_FAULT_MEMORY works (two-dimensional paging).
    case preFaultMemory = "pre_fault_memory"
    /// Pages can be poisoned on purpose (memory_failure).
    case memoryFailure = "memory_failure"
    /// In-place conversion on guest_memfd (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES).
    case inPlaceConversion = "in_place_conversion"
    /// Pages can be pinned with GUP (FOLL_PIN), or referenced by GUP-fast, from a scenario.
    case pins = "pins"
    /// Host processes can fork and exit.
    case processes = "processes"
    /// IOMMU domains and device DMA.
    case iommu = "iommu"
    /// A pKVM-style hypervisor with per-page ownership.
    case pkvm = "pkvm"
    /// SNP- and TDX-like VM types: accesses carry private/shared, conversion is lossy.
    case cocoPlatforms = "coco_platforms"
    /// GUEST_MEMFD_FLAG_NO_DIRECT_MAP (the in-flight series).
    case noDirectMap = "no_direct_map"
}

/// How a device's IOMMU is managed: a policy per domain.
public enum IOMMUModel: String, CaseIterable, Hashable, Sendable {
    /// The host maps DMA by long-term pinning the pages (VFIO_IOMMU_MAP_DMA): a
    /// mapped page is pinned, so it blocks to-private until unmapped.
    case vfio
    /// A hypervisor owns the IOMMU (pKVM-style) and maps guest memory by hypercall:
    /// it refuses private pages, and conversion of a mapped page is refused.
    case hypervisor
    /// Nested translation: the device's stage-1 maps IOVA to GPA, and its stage-2
    /// mirrors the VM's CPU stage-2 for shared memory; DMA to a private gfn faults.
    case nested
    /// Shared virtual addressing: the device walks the binding process's page tables
    /// (IOVA = virtual address) and caches translations in its IOTLB, which the
    /// process's MMU notifier invalidates, as it does KVM's stage-2.
    case sva
}

/// Who holds whom between a guest_memfd file and its VM: a policy per run.
public enum BindingOwnership: String, CaseIterable, Hashable, Sendable {
    /// Upstream: the file holds the VM (kvm_get_kvm); memslots do not hold the file,
    /// so closing it turns later guest faults into memory-fault exits.
    case fileHoldsVM = "file_holds_vm"
    /// The alternative from the design discussions: memslots hold the file; the file
    /// binds to a VM at its first bind, and can be created without one (on /dev/kvm).
    case memslotHoldsFile = "memslot_holds_file"
}

/// What a real kernel offers where kernels differ: what a model needs to stand for it.
public struct HostProfile: Hashable, Sendable {
    /// KVM_CAP_VM_TYPES (bit n = type n accepted).
    public var vmTypes: UInt64
    /// KVM_SET_MEMORY_ATTRIBUTES with PRIVATE.
    public var memoryAttributes: Bool
    /// Two-dimensional paging (KVM_CAP_PRE_FAULT_MEMORY).
    public var tdp: Bool
    /// In-place conversion (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES).
    public var inPlace: Bool
    /// KVM_MAX_VCPU_IDS (KVM_CAP_MAX_VCPU_ID).
    public var maxVCPUIDs: UInt32
    /// What private writable mappings may commit, in bytes: RAM + swap under the
    /// overcommit heuristic, UInt64.max with overcommit_memory = 1.
    public var commitLimit: UInt64
    /// kvm_gmem_bind() sums offset and size as a signed loff_t (6.18's bug).
    public var bindOffsetWraps: Bool
    /// Shadow paging's prefetch maps GMEM_ONLY gfns from userspace_addr (kvm-pvm's bug).
    public var shadowPrefetchFromHVA: Bool
    /// GUEST_MEMFD_FLAG_MMAP/INIT_SHARED exist (KVM_CAP_GUEST_MEMFD_FLAGS is nonzero).
    public var gmemFlags: Bool = true
    public init(vmTypes: UInt64, memoryAttributes: Bool, tdp: Bool, inPlace: Bool, maxVCPUIDs: UInt32, commitLimit: UInt64,
                bindOffsetWraps: Bool, shadowPrefetchFromHVA: Bool) {
        (self.vmTypes, self.memoryAttributes, self.tdp, self.inPlace) = (vmTypes, memoryAttributes, tdp, inPlace)
        (self.maxVCPUIDs, self.commitLimit, self.bindOffsetWraps) = (maxVCPUIDs, commitLimit, bindOffsetWraps)
        self.shadowPrefetchFromHVA = shadowPrefetchFromHVA
    }
}

/// A host process: pid 1 is the VMM that drives KVM.
public struct ProcessHandle: Hashable, Sendable {
    public var pid: UInt32
    public init(pid: UInt32) { self.pid = pid }
    public static let vmm = ProcessHandle(pid: 1)
}

/// The operations a VMM performs on KVM and guest_memfd: one protocol, implemented
/// by the model and by the kernel backend. Scenario runs, the VMM side and the tests
/// talk only to this protocol.
///
/// Every method is the uapi call of the same name; errors are the kernel's errnos.
public protocol Backend: AnyObject {
    /// "model" or "kernel".
    var name: String { get }

    /// Why this backend lacks `feature`, or nil when it has it.
    func missing(_ feature: Feature) -> String?

    /// KVM_CHECK_EXTENSION on /dev/kvm (`fd` nil) or on a VM fd.
    func checkExtension(on fd: FD?, _ cap: Capability) throws(BackendError) -> UInt64
    /// KVM_CREATE_VM with a raw type number, converting memory by `conversion`.
    func createVM(type: UInt64, conversion: ConversionPolicy) throws(BackendError) -> FD
    /// KVM_CREATE_VCPU.
    func createVCPU(vm: FD, id: UInt32) throws(BackendError) -> FD
    /// KVM_CREATE_GUEST_MEMFD issued on `fd` (normally a VM fd; nil: /dev/kvm).
    func createGuestMemfd(on fd: FD?, size: UInt64, flags: UInt64) throws(BackendError) -> FD
    /// Chooses the binding-ownership policy for this run (before anything is created).
    func setBindingOwnership(_ policy: BindingOwnership) throws(BackendError)
    /// memfd_create(2) followed by ftruncate(2) to `size`; with `secret`,
    /// memfd_secret(2): memory removed from the kernel's direct map.
    func memfdCreate(size: UInt64, secret: Bool) throws(BackendError) -> FD
    /// close(2).
    func close(_ fd: FD) throws(BackendError)
    /// fstat(2).
    func fstat(_ fd: FD) throws(BackendError) -> FileStat
    /// read(2).
    func read(_ fd: FD, count: UInt64) throws(BackendError) -> [UInt8]
    /// write(2); returns the number of bytes written.
    func write(_ fd: FD, _ bytes: [UInt8]) throws(BackendError) -> UInt64
    /// pread(2).
    func pread(_ fd: FD, count: UInt64, offset: UInt64) throws(BackendError) -> [UInt8]
    /// pwrite(2).
    func pwrite(_ fd: FD, _ bytes: [UInt8], offset: UInt64) throws(BackendError) -> UInt64
    /// lseek(2); returns the new offset.
    func lseek(_ fd: FD, offset: Int64, whence: Int32) throws(BackendError) -> UInt64
    /// ftruncate(2).
    func ftruncate(_ fd: FD, size: UInt64) throws(BackendError)
    /// fallocate(2).
    func fallocate(_ fd: FD, mode: UInt32, offset: UInt64, length: UInt64) throws(BackendError)
    /// mmap(2) of `fd`, or anonymous memory when `fd` is nil.
    func mmap(fd: FD?, offset: UInt64, length: UInt64, prot: Protection, shared: Bool)
        throws(BackendError) -> Mapping
    /// munmap(2).
    func munmap(_ mapping: Mapping) throws(BackendError)
    /// mprotect(2).
    func mprotect(address: UInt64, length: UInt64, prot: Protection) throws(BackendError)
    /// A host store to `address` (a memcpy into the mapping).
    func hostWrite(address: UInt64, bytes: [UInt8]) throws(BackendError) -> HostAccess
    /// A host load from `address`.
    func hostRead(address: UInt64, count: UInt64) throws(BackendError) -> HostAccess
    /// KVM_SET_USER_MEMORY_REGION2.
    func setUserMemoryRegion2(vm: FD, _ region: UserMemoryRegion2) throws(BackendError)
    /// KVM_SET_USER_MEMORY_REGION (v1: the guest_memfd fields are absent).
    func setUserMemoryRegion(vm: FD, _ region: UserMemoryRegion2) throws(BackendError)
    /// KVM_SET_MEMORY_ATTRIBUTES.
    func setMemoryAttributes(vm: FD, address: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError)
    /// One guest access through KVM_RUN on a vCPU.
    func guestAccess(vcpu: FD, _ access: GuestAccess) throws(BackendError) -> GuestOutcome
    /// KVM_PRE_FAULT_MEMORY; returns the updated (gpa, size) of the range not yet done.
    func preFaultMemory(vcpu: FD, gpa: UInt64, size: UInt64, flags: UInt64)
        throws(BackendError) -> (gpa: UInt64, size: UInt64)
    /// KVM_ENABLE_CAP on a VM with one argument (args[0]).
    func enableCap(vm: FD, _ cap: Capability, _ arg: UInt64) throws(BackendError)
    /// Runs a guest program on a vCPU at CPL3. `handler` answers conversion requests
    /// that reach the VMM (the doorbell; KVM_EXIT_HYPERCALL where KVM forwards it)
    /// with the value the guest receives.
    func runGuestProgram(vcpu: FD, _ program: GuestProgram, handler: (ConversionRequest) -> UInt64)
        throws(BackendError) -> GuestProgramResult
    /// KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: in-place conversion of
    /// [offset, offset + size) to private (attributes PRIVATE) or shared (0).
    func setGuestMemfdAttributes(fd: FD, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError) -> ConversionOutcome
    /// pin_user_pages() on [address, address + length) of this process: FOLL_WRITE
    /// with `write`, else a read-only pin; FOLL_LONGTERM with `longterm`.
    func pin(address: UInt64, length: UInt64, longterm: Bool, write: Bool) throws(BackendError) -> ObjectHandle
    /// unpin_user_pages().
    func unpin(_ pin: ObjectHandle) throws(BackendError)
    /// GUP-fast's lockless walk: a speculative reference on each mapped page, held
    /// until `dropSpeculativeReferences` (the recheck).
    func gupFastReference(address: UInt64, length: UInt64) throws(BackendError) -> ObjectHandle
    func dropSpeculativeReferences(_ handle: ObjectHandle) throws(BackendError)
    /// fork(2) of the current process.
    func fork() throws(BackendError) -> ProcessHandle
    /// The process that issues the calls that follow.
    func switchProcess(_ process: ProcessHandle) throws(BackendError)
    /// exit(2) of `process` (not the VMM).
    func exitProcess(_ process: ProcessHandle) throws(BackendError)
    /// Creates an IOMMU domain managed by `model` (nested: for the VM `vm`).
    func createIOMMUDomain(_ model: IOMMUModel, vm: FD?) throws(BackendError) -> ObjectHandle
    /// Maps host memory (VFIO: `address` in this process), guest_memfd memory
    /// (hypervisor: `fd`, `offset`) or guest physical memory (nested: `offset` is
    /// the GPA) at `iova`.
    func iommuMap(domain: ObjectHandle, iova: UInt64, address: UInt64?, fd: FD?, offset: UInt64, length: UInt64)
        throws(BackendError)
    func iommuUnmap(domain: ObjectHandle, iova: UInt64, length: UInt64) throws(BackendError)
    /// A device's DMA through the domain: the bytes read, or empty for a write.
    func dma(domain: ObjectHandle, iova: UInt64, write: [UInt8]?, count: UInt64) throws(BackendError) -> [UInt8]
    /// A pKVM guest (protected: memory by donation; else by sharing).
    func pkvmCreateGuest(protected: Bool) throws(BackendError) -> ObjectHandle
    /// One pKVM hypercall on the ownership state machine.
    func pkvmCall(_ call: PKVMCall, _ args: PKVMArgs) throws(BackendError)
    /// A host access to pKVM page `page` (guest nil) or a guest access at `gfn`;
    /// returns the page's byte after the access.
    func pkvmAccess(page: UInt64, guest: ObjectHandle?, gfn: UInt64, write: UInt8?) throws(BackendError) -> UInt8
    /// The page's state as the host, the hypervisor and (if given) a guest see it.
    func pkvmState(page: UInt64, guest: ObjectHandle?, gfn: UInt64) throws(BackendError) -> [String: PageState]
    /// The invariants (isolation, coherence, lifetime) over the whole system now.
    /// Only a backend that can see all the state can answer.
    func checkInvariants() throws(BackendError) -> [Violation]
    /// memory_failure() on the page of a guest_memfd at `offset` (hwpoison).
    func memoryFailure(fd: FD, offset: UInt64) throws(BackendError)
}

extension Backend {
    /// pin_user_pages(FOLL_WRITE [| FOLL_LONGTERM]).
    public func pin(address: UInt64, length: UInt64, longterm: Bool) throws(BackendError) -> ObjectHandle {
        try pin(address: address, length: length, longterm: longterm, write: true)
    }

    /// memfd_create(2) + ftruncate(2): ordinary shared memory.
    public func memfdCreate(size: UInt64) throws(BackendError) -> FD {
        try memfdCreate(size: size, secret: false)
    }

    /// KVM_CREATE_VM with the x86 mainline conversion model (VM-level attributes).
    public func createVM(type: UInt64) throws(BackendError) -> FD {
        try createVM(type: type, conversion: .attributes)
    }
}

extension VMExit: CustomStringConvertible {
    /// The exit as KVM names it, with its payload in hex (for traces).
    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .memoryFault(let flags, let gpa, let size):
            let kind = flags & UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE != 0 ? "private" : "shared"
            return "KVM_EXIT_MEMORY_FAULT \(kind) gpa \(hex(gpa)) size \(hex(size))"
        case .mmio(let gpa, let length, let isWrite):
            return "KVM_EXIT_MMIO \(isWrite ? "write" : "read") gpa \(hex(gpa)) len \(length)"
        case .shutdown: return "KVM_EXIT_SHUTDOWN"
        case .internalError(let sub): return "KVM_EXIT_INTERNAL_ERROR suberror \(sub)"
        case .hypercall(let nr, let args): return "KVM_EXIT_HYPERCALL nr \(nr) args \(args.map(hex).joined(separator: " "))"
        case .other(let reason): return "exit reason \(reason)"
        }
    }
}

extension GuestOutcome: CustomStringConvertible {
    public var description: String {
        switch self {
        case .completed(let bytes): return bytes.isEmpty ? "completed" : "completed, read " + bytes.prefix(8).map { String($0, radix: 16) }.joined(separator: " ")
        case .exit(let e): return e.description
        case .failed(let errno, let exit): return "\(errno.name)" + (exit.map { " with \($0)" } ?? "")
        }
    }
}
