#if os(Linux)
import CKVM
import GMemBackend
import Glibc

/// What this host's KVM offers, measured by trying it.
public struct HostProbe: Sendable {
    public var apiVersion: Int
    /// Capability values on /dev/kvm and on a default VM.
    public var capabilities: [(cap: Capability, kvm: UInt64, defaultVM: UInt64)]
    /// VM types KVM_CREATE_VM accepted.
    public var vmTypes: [VMType]
    /// guest_memfd flag bits KVM_CREATE_GUEST_MEMFD accepted on a default VM.
    public var gmemFlags: UInt64
    /// KVM_SET_MEMORY_ATTRIBUTES on a default VM (attributes 0): ok or its errno.
    public var setMemoryAttributes: String
    /// KVM_PRE_FAULT_MEMORY on a vCPU: ok or its errno.
    public var preFaultMemory: String
    /// The outcome of a CPL3 copy loop through a guest_memfd slot.
    public var guestCode: String
    /// What a CPL3 KVM_HC_MAP_GPA_RANGE hypercall did, with the exit enabled.
    public var hypercall: String
    public var cpuVendor: String

    /// Runs the probe; nil with the reason where /dev/kvm cannot be used.
    public static func run() -> Result<HostProbe, BackendError> {
        do {
            return .success(try measure())
        } catch {
            return .failure(error)
        }
    }

    static func describe(_ body: () throws(BackendError) -> Void) -> String {
        do {
            try body()
            return "ok"
        } catch {
            switch error {
            case .errno(let e): return e.name
            case .unsupported(let why): return "unsupported: \(why)"
            }
        }
    }

    static func measure() throws(BackendError) -> HostProbe {
        let k = try KernelBackend()
        let api = Int(ckvm_ioctl_val(k.kvm, CKVM_GET_API_VERSION, 0))
        let vm = try k.createVM(type: 0)
        var caps: [(Capability, UInt64, UInt64)] = []
        for c in Capability.allCases {
            let onVM = (try? k.checkExtension(on: vm, c)) ?? 0
            caps.append((c, k.capability(c), onVM))
        }
        var types: [VMType] = []
        for t in VMType.allCases {
            if let fd = try? k.createVM(type: t.number) {
                types.append(t)
                try? k.close(fd)
            }
        }
        var flags: UInt64 = 0
        for bit in 0..<64 {
            if let fd = try? k.createGuestMemfd(on: vm, size: 4096, flags: 1 << UInt64(bit)) {
                flags |= 1 << UInt64(bit)
                try? k.close(fd)
            }
        }
        let attrs = describe { () throws(BackendError) in
            try k.setMemoryAttributes(vm: vm, address: 0, size: 4096, attributes: 0, flags: 0)
        }
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        // Before any memslot and any KVM_RUN, kvm-pvm answers ENOSPC; asked after the
        // guest has run over a memslot it gives the steady answer (EOPNOTSUPP there).
        let prefaultCold = describe { () throws(BackendError) in
            _ = try k.preFaultMemory(vcpu: vcpu, gpa: 1 << 30, size: 4096, flags: 0)
        }
        var guest = "not tried"
        // A guest_memfd memslot where the default VM takes one (6.18); where it needs a
        // VM with private memory (6.12: EINVAL), an ordinary memslot over anonymous memory.
        var through = "guest_memfd"
        let bound = describe { () throws(BackendError) in
            let gmem = try k.createGuestMemfd(on: vm, size: 1 << 21, flags: flags & UAPI.GUEST_MEMFD_FLAG_MMAP)
            try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: 1 << 30, memorySize: 1 << 21,
                userspaceAddr: 0, guestMemfd: UInt32(gmem.raw)))
        }
        if bound != "ok" {
            through = "an anonymous memslot (a guest_memfd memslot on a default VM: \(bound))"
            _ = describe { () throws(BackendError) in
                let anon = try k.mmap(fd: nil, offset: 0, length: 1 << 21, prot: [.read, .write], shared: false)
                try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                    slot: 0, flags: 0, guestPhysAddr: 1 << 30, memorySize: 1 << 21, userspaceAddr: anon.address))
            }
        }
        let pattern: [UInt8] = [0xde, 0xad, 0xbe, 0xef]
        do {
            let w = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 1 << 30, kind: .write(pattern)))
            let r = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 1 << 30, kind: .read(count: 4)))
            guest = (w == .completed([]) && r == .completed(pattern))
                ? "runs natively at CPL3 in 64-bit mode; accesses go through \(through)"
                : "CPL3 copy loop did not complete: \(w), \(r)"
        } catch {
            guest = "could not run: \(error)"
        }
        var prefault = describe { () throws(BackendError) in
            _ = try k.preFaultMemory(vcpu: vcpu, gpa: 1 << 30, size: 4096, flags: 0)
        }
        if prefault != prefaultCold { prefault += " (\(prefaultCold) before any memslot or KVM_RUN)" }
        var hypercall = "not tried"
        let enable = describe { () throws(BackendError) in
            try k.enableCap(vm: vm, .exitHypercall, 1 << UAPI.KVM_HC_MAP_GPA_RANGE)
        }
        if enable == "ok" {
            k.guestTimeoutMS = 500
            let outcome = try k.runHarnessCode(
                vcpu: vcpu, rip: GuestHarness.hypercallCode, rax: UAPI.KVM_HC_MAP_GPA_RANGE, rbx: 1 << 30, rcx: 1, rdx: 0)
            switch outcome {
            case .exit(.hypercall(let nr, _)):
                hypercall = "KVM_EXIT_HYPERCALL arrives (nr \(nr))"
            case .exit(.other(2)):
                let rax = Int64(bitPattern: try k.rax(vcpu: vcpu))
                hypercall = "no exit: the CPL3 guest got \(rax) back (KVM refuses hypercalls from CPL3)"
            default:
                hypercall = "no exit: \(outcome)"
            }
        } else {
            hypercall = "KVM_ENABLE_CAP(EXIT_HYPERCALL) failed: \(enable)"
        }
        return HostProbe(
            apiVersion: api, capabilities: caps.map { ($0.0, $0.1, $0.2) }, vmTypes: types, gmemFlags: flags,
            setMemoryAttributes: attrs, preFaultMemory: prefault, guestCode: guest, hypercall: hypercall,
            cpuVendor: GuestHarness.isAMD ? "AMD" : "Intel or other")
    }

    /// Which parts of the system run on this host's kernel, and which only on the model.
    public var coverage: [(part: String, real: Bool, why: String)] {
        let cap = Dictionary(uniqueKeysWithValues: capabilities.map { ($0.cap, $0.kvm) })
        let inPlace = false  // KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd (cap 249) is not in 6.18
        return [
            ("guest_memfd create, file operations, fallocate", true, "KVM_CAP_GUEST_MEMFD = \(cap[.guestMemfd] ?? 0)"),
            ("host mmap of guest_memfd (MMAP, INIT_SHARED)", gmemFlags & 3 == 3, "supported flags 0x\(String(gmemFlags, radix: 16))"),
            ("memslots (KVM_SET_USER_MEMORY_REGION2)", (cap[.userMemory2] ?? 0) != 0, "KVM_CAP_USER_MEMORY2"),
            ("guest accesses on a real vCPU", guestCode.hasPrefix("runs"), guestCode),
            ("sw_protected VMs", vmTypes.contains(.swProtected), "VM types: \(vmTypes.map(\.rawValue).joined(separator: ", "))"),
            ("memory attributes (x86 conversion model)", setMemoryAttributes == "ok" && (cap[.memoryAttributes] ?? 0) != 0,
             "KVM_SET_MEMORY_ATTRIBUTES: \(setMemoryAttributes)"),
            ("KVM_PRE_FAULT_MEMORY", preFaultMemory.hasPrefix("ok"), "KVM_PRE_FAULT_MEMORY: \(preFaultMemory)"),
            ("KVM_HC_MAP_GPA_RANGE exits", hypercall.hasPrefix("KVM_EXIT_HYPERCALL"), hypercall),
            ("in-place conversion with refcount checks", inPlace, "not in this kernel (guest_memfd attributes are post-6.18)"),
            ("memory failure (hwpoison)", false, "would poison a real page; model only"),
        ]
    }
}
#endif
