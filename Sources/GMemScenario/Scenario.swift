import GMemBackend
import GMemModel

/// A handle a step refers to: a name bound by an earlier step's `as`, or a raw fd
/// number (to show what the kernel does with a closed or bogus descriptor).
public enum Ref: Hashable, Sendable, CustomStringConvertible {
    case name(String)
    case raw(Int32)
    public var description: String {
        switch self {
        case .name(let n): n
        case .raw(let r): "fd \(r)"
        }
    }
}

/// A region for `vmm_manage`, names unresolved.
public struct RegionRef: Hashable, Sendable {
    public var gpa: UInt64
    public var size: UInt64
    public var guestMemfd: Ref
    public var offset: UInt64
    public var sharedBacking: Ref?
}

/// A host address given as a number or as a mapping plus an offset.
public enum AddressRef: Hashable, Sendable {
    case absolute(UInt64)
    case map(String, offset: UInt64)
}

/// KVM_SET_USER_MEMORY_REGION(2) arguments with names still unresolved.
public struct RegionSpec: Hashable, Sendable {
    public var slot: UInt32
    public var flags: UInt32
    public var gpa: UInt64
    public var size: UInt64
    public var userspaceAddr: AddressRef
    public var guestMemfd: Ref?
    public var guestMemfdOffset: UInt64
}

/// One scenario operation, with its arguments checked and typed.
public enum Op: Hashable, Sendable {
    case createVM(type: UInt64, conversion: ConversionPolicy)
    case createVCPU(vm: Ref, id: UInt32)
    case checkExtension(on: Ref?, cap: Capability)
    case createGuestMemfd(on: Ref?, size: UInt64, flags: UInt64)
    case close(Ref)
    case fstat(Ref)
    case read(Ref, count: UInt64)
    case write(Ref, [UInt8])
    case pread(Ref, count: UInt64, offset: UInt64)
    case pwrite(Ref, [UInt8], offset: UInt64)
    case lseek(Ref, offset: Int64, whence: Int32)
    case ftruncate(Ref, size: UInt64)
    case fallocate(Ref, mode: UInt32, offset: UInt64, length: UInt64)
    case memfdCreate(size: UInt64, secret: Bool)
    case mmap(fd: Ref?, offset: UInt64, length: UInt64, prot: Protection, shared: Bool)
    case munmap(map: String)
    case mprotect(map: String, offset: UInt64, length: UInt64?, prot: Protection)
    case hostWrite(map: String, offset: UInt64, [UInt8])
    case hostRead(map: String, offset: UInt64, count: UInt64)
    case setUserMemoryRegion(vm: Ref, RegionSpec, version2: Bool)
    case setMemoryAttributes(vm: Ref, gpa: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
    case guestWrite(vcpu: Ref, gpa: UInt64, [UInt8], isPrivate: Bool?, vmm: Bool)
    case guestRead(vcpu: Ref, gpa: UInt64, count: UInt64, isPrivate: Bool?, vmm: Bool)
    case preFaultMemory(vcpu: Ref, gpa: UInt64, size: UInt64, flags: UInt64)
    case memoryFailure(Ref, offset: UInt64)
    case enableCap(vm: Ref, cap: Capability, arg: UInt64)
    /// `vmm`: the VMM's manager for this VM answers the program's requests.
    case guestProgram(vcpu: Ref, GuestProgram, doorbellResult: UInt64, vmm: Bool)
    case checkInvariants
    case vmmManage(vm: Ref, policy: ConversionPolicy, regions: [RegionRef], initiallyPrivate: Bool, prefault: Bool)
    case vmmConvert(vm: Ref, gpa: UInt64, size: UInt64, toPrivate: Bool)
    case vmmListener(vm: Ref, domain: String, map: String, gpaBase: UInt64)
    case fork
    case exitProcess
    case gupFast(map: String, offset: UInt64, length: UInt64)
    case gupFastDrop(ref: String)
    case iommuDomain(IOMMUModel, vm: Ref?)
    case iommuMap(domain: String, iova: UInt64, map: String?, fd: Ref?, offset: UInt64, length: UInt64)
    case iommuUnmap(domain: String, iova: UInt64, length: UInt64)
    case dmaRead(domain: String, iova: AddressRef, count: UInt64)
    case dmaWrite(domain: String, iova: AddressRef, [UInt8])
    case pkvmGuest(protected: Bool)
    case pkvmCall(PKVMCall, page: UInt64, guest: String?, gfn: UInt64, pages: UInt64, prot: UInt64)
    case pkvmAccess(page: UInt64, guest: String?, gfn: UInt64, write: UInt8?)
    case pkvmState(page: UInt64, guest: String?, gfn: UInt64)
    case convert(Ref, offset: UInt64, size: UInt64, toPrivate: Bool)
    case pin(map: String, offset: UInt64, length: UInt64, longterm: Bool, write: Bool)
    case unpin(pin: String)

    /// Steps that only look: skipping one on one backend of a differential run leaves
    /// the two systems in the same state.
    var isReadOnly: Bool {
        switch self {
        case .checkInvariants, .fstat, .checkExtension, .pkvmState: true
        default: false
        }
    }

    /// What kind of handle the step's `as` names.
    var produces: HandleKind? {
        switch self {
        case .createVM: .fd
        case .createVCPU, .createGuestMemfd, .memfdCreate: .fd
        case .mmap: .map
        case .pin: .pin
        case .fork: .process
        case .gupFast: .ref
        case .iommuDomain: .domain
        case .pkvmGuest: .guest
        default: nil
        }
    }
}

/// Handle namespaces: file descriptors, host mappings, pins.
public enum HandleKind: String, Hashable, Sendable {
    case fd, map, pin, process, ref, domain, guest
}

/// How a step ended, as `expect` names it and as `--json` reports it.
public enum Outcome: Hashable, Sendable, CustomStringConvertible {
    case ok
    case errno(Errno)
    case sigbus
    case sigsegv
    /// KVM_RUN returned 0 with an exit (MMIO, shutdown).
    case exit

    public var description: String {
        switch self {
        case .ok: "ok"
        case .errno(let e): e.name
        case .sigbus: "SIGBUS"
        case .sigsegv: "SIGSEGV"
        case .exit: "exit"
        }
    }
}

/// One step of a scenario.
public struct Step: Hashable, Sendable {
    public var index: Int
    public var opName: String
    public var op: Op
    public var name: String?
    /// The host process that issues the call (a name from `fork`); nil: the VMM.
    public var process: String?
    public var expect: Outcome
    /// `"expect": "any"`: the step is run and its outcome shown, never judged (the
    /// fuzzer's steps, and users asking what the kernel does).
    public var observe: Bool = false
    /// A guest access or pre-fault named its target with `vcpu` (run on that fd,
    /// whatever it is) rather than `vm` (the VM's vCPU 0, created on first use).
    public var namesVCPU: Bool = false
    public var expectValue: JSON?
    public var expectBytes: [UInt8]?
    public var expectExit: JSON?
    public var comment: String?
}

/// A parsed scenario file.
public struct Scenario: Hashable, Sendable {
    public var file: String
    public var name: String
    public var description: String?
    /// Host features the scenario needs; a backend without them skips it.
    public var requires: [Feature] = []
    /// Policies the scenario runs under (`"policies": {"binding": ...}`).
    public var binding: BindingOwnership?
    public var steps: [Step]
    /// Actors for `gmem explore`; empty for a plain scenario.
    public var actors: [ActorSpec] = []
    /// Mutants the explorer must find with this file (`gmem explore --mutants`).
    public var catches: [Mutant] = []
}

/// One actor of an exploration: a name and its program.
public struct ActorSpec: Hashable, Sendable {
    public var name: String
    public var program: [ActorOp]
}

/// One op of an actor's program.
public enum ActorOp: Hashable, Sendable {
    /// A scenario step, run atomically.
    case step(Step)
    /// A stage-2 fault split at mmu_lock: resolve, then install or retry.
    case guestFault(vcpu: Ref, gpa: UInt64, write: Bool)
    /// pin_user_pages_fast() of one page of a mapping, split at its lockless steps:
    /// walk, grab, recheck.
    case gupFastPin(map: String, offset: UInt64)
}

/// Why a scenario file is not valid: the file, the step and the field, and what was
/// expected there.
public struct ScenarioError: Error, Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var step: Int?
    public var op: String?
    public var field: String?
    public var message: String

    public var description: String {
        var where_ = file
        if let step { where_ += ": step \(step)" + (op.map { " (\($0))" } ?? "") }
        if let field { where_ += ": field '\(field)'" }
        return where_ + ": " + message
    }
}
