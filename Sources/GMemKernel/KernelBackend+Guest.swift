#if os(Linux)
import CKVM
import GMemBackend
import Glibc

/// Guest accesses on a real vCPU: the harness, KVM_RUN and its exits, pre-faults and
/// guest programs.
extension KernelBackend {
    // MARK: Guest accesses

    /// The harness of the vCPU's VM, created at its first guest access.
    func harness(for v: VCPU) throws(BackendError) -> GuestHarness {
        if let h = v.vm.harness { return h }
        let used = v.vm.slots
        guard let slot = (UInt32(0)..<UAPI.KVM_USER_MEM_SLOTS).reversed().first(where: { used[$0] == nil }) else {
            throw .unsupported("no free memslot for the guest harness")
        }
        let h: GuestHarness
        do {
            h = try GuestHarness(vmFD: v.vmFD, slot: slot)
        } catch .errno(let e) where e == .EEXIST {
            throw .unsupported("GPA [0, 32 MiB) is taken by the scenario's memslots; the guest harness needs it")
        }
        v.vm.harness = h
        return h
    }

    public func guestAccess(vcpu: FD, _ access: GuestAccess) throws(BackendError) -> GuestOutcome {
        guard let v = vcpus[real(vcpu)] else {
            // Not a vCPU this backend made: let KVM_RUN say what it says.
            try check(ckvm_ioctl_val(real(vcpu), CKVM_RUN, 0))
            throw .unsupported("KVM_RUN on a descriptor that is not one of this backend's vCPUs")
        }
        if access.isPrivate != nil {
            throw .unsupported("this host's VMs decide private/shared from memory attributes; `private` needs a platform with a shared-GPA bit")
        }
        let count: UInt64
        switch access.kind {
        case .read(let n): count = n
        case .write(let b): count = UInt64(b.count)
        }
        if case .read = access.kind, let why = Limits.transferRefusal(count, limit: transferLimit, what: "a guest read") {
            throw .unsupported(why)
        }
        try budget.charge(Self.pagesTouched(access.gpa, count), "a guest access")
        let (end, overflow) = access.gpa.addingReportingOverflow(count)
        guard !overflow, end <= GuestHarness.mappableLimit else {
            throw .unsupported("the guest harness identity-maps GPAs below 2^47 only")
        }
        let h = try harness(for: v)
        if access.gpa < GuestHarness.size && count > 0 {
            throw .unsupported("GPA [0, 32 MiB) is the kernel backend's guest harness")
        }
        if !v.configured {
            try GuestHarness.configure(vcpuFD: v.fd, kvmFD: kvm)
            v.configured = true
        }
        guard h.ensureMapped((access.gpa >> 30)..<((end + (1 << 30) - 1) >> 30)) else {
            throw .unsupported("the guest harness ran out of page-table pages")
        }
        var out: [UInt8] = []
        var done: UInt64 = 0
        while done < count || count == 0 {
            let n = min(count - done, GuestHarness.bounceCapacity)
            let bounceGPA = GuestHarness.bounce.lowerBound
            let gpa = access.gpa + done
            if case .write(let bytes) = access.kind {
                bytes.withUnsafeBytes { src in
                    h.bounceBuffer.copyMemory(from: src.baseAddress! + Int(done), byteCount: Int(n))
                }
                try GuestHarness.setRegisters(vcpuFD: v.fd, source: bounceGPA, destination: gpa, count: n)
            } else {
                try GuestHarness.setRegisters(vcpuFD: v.fd, source: gpa, destination: bounceGPA, count: n)
            }
            if let stop = try runToDone(v) { return stop }
            if case .read = access.kind {
                out.append(contentsOf: UnsafeRawBufferPointer(start: h.bounceBuffer, count: Int(n)))
            }
            done += n
            if count == 0 { break }
        }
        return .completed(out)
    }

    /// Runs the vCPU until the copy loop reports done (nil) or something else
    /// stops it (the outcome to report).
    func runToDone(_ v: VCPU) throws(BackendError) -> GuestOutcome? {
        let r = ckvm_run(v.fd, guestTimeoutMS)
        let reason = v.exitReason
        if r < 0 {
            let errno = Errno(rawValue: -r)
            if errno == .EINTR {
                return .failed(.EINTR, nil)  // the time limit stopped a guest that did not finish
            }
            if reason == 39 && (errno == .EFAULT || errno == .EHWPOISON) {
                let mf = v.exitUnion.load(as: ckvm_memory_fault.self)
                return .failed(errno, .memoryFault(flags: mf.flags, gpa: mf.gpa, size: mf.size))
            }
            return .failed(errno, nil)
        }
        switch reason {
        case 2:  // KVM_EXIT_IO
            let port = v.exitUnion.load(fromByteOffset: 2, as: UInt16.self)
            completePendingExit(v)
            if port == GuestHarness.donePort { return nil }
            return .exit(.other(reason: reason))
        case 6:  // KVM_EXIT_MMIO
            let gpa = v.exitUnion.load(as: UInt64.self)
            let len = v.exitUnion.load(fromByteOffset: 16, as: UInt32.self)
            let isWrite = v.exitUnion.load(fromByteOffset: 20, as: UInt8.self) != 0
            completePendingExit(v)
            return .exit(.mmio(gpa: gpa, length: len, isWrite: isWrite))
        case 8:
            return .exit(.shutdown)
        case 17:
            return .exit(.internalError(suberror: v.exitUnion.load(as: UInt32.self)))
        case 3:
            let nr = v.exitUnion.load(as: UInt64.self)
            let args = (0..<6).map { v.exitUnion.load(fromByteOffset: 8 + $0 * 8, as: UInt64.self) }
            completePendingExit(v)
            return .exit(.hypercall(nr: nr, args: args))
        default:
            return .exit(.other(reason: reason))
        }
    }

    /// Runs the vCPU from `rip` in the harness (for tests of what a broken guest
    /// does, e.g. one that never exits): the outcome, after the time limit at most.
    func runHarnessCode(vcpu: FD, rip: UInt64, rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0)
        throws(BackendError) -> GuestOutcome
    {
        guard let v = vcpus[real(vcpu)] else { throw .errno(.EBADF) }
        _ = try harness(for: v)
        if !v.configured {
            try GuestHarness.configure(vcpuFD: v.fd, kvmFD: kvm)
            v.configured = true
        }
        var regs = kvm_regs()
        regs.rip = rip
        regs.rsp = GuestHarness.stackTop
        regs.rflags = 0x3002
        (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (rax, rbx, rcx, rdx)
        try check(ckvm_ioctl_ptr(v.fd, CKVM_SET_REGS, &regs))
        return try runToDone(v) ?? .completed([])
    }

    /// RAX of a vCPU this backend made.
    func rax(vcpu: FD) throws(BackendError) -> UInt64 {
        var regs = kvm_regs()
        try check(ckvm_ioctl_ptr(real(vcpu), CKVM_GET_REGS, &regs))
        return regs.rax
    }

    /// KVM_ENABLE_CAP on a VM.
    public func enableCap(vm: FD, _ cap: Capability, _ arg0: UInt64) throws(BackendError) {
        var c = kvm_enable_cap()
        c.cap = cap.number
        c.args.0 = arg0
        try check(ckvm_ioctl_ptr(real(vm), CKVM_ENABLE_CAP, &c))
    }

    /// KVM completes an IO or MMIO exit at the next KVM_RUN; run once with
    /// immediate_exit so that completion cannot land in the next access.
    func completePendingExit(_ v: VCPU) {
        // A rep movsb that stopped on MMIO is mid-instruction: completing the exit makes
        // KVM's emulator run the rest of it (another MMIO exit, one byte on), and that
        // pending exit would corrupt the next access. So the string op is cut short
        // first: for an MMIO write RCX = 0 ends it; for an MMIO read RCX = 1 lets the
        // emulator consume the read it asked for (else mmio_read_completed stays set
        // and the next access's first MMIO read takes that stale byte without an exit)
        // and end there. If KVM still comes back with an exit, complete that too.
        for round in 0..<4 {
            // Port I/O exits (the copy's `out`, a program's doorbell) stop between
            // instructions: only an MMIO exit leaves a string op half done.
            if v.exitReason == 6 {
                var regs = kvm_regs()
                let isRead = v.exitUnion.load(fromByteOffset: 20, as: UInt8.self) == 0
                let want: UInt64 = isRead && round == 0 ? 1 : 0
                if ckvm_ioctl_ptr(v.fd, CKVM_GET_REGS, &regs) == 0 && regs.rcx != want {
                    regs.rcx = want
                    _ = ckvm_ioctl_ptr(v.fd, CKVM_SET_REGS, &regs)
                }
            }
            v.immediateExit = 1
            let r = ckvm_run(v.fd, guestTimeoutMS)
            v.immediateExit = 0
            if r < 0 || (v.exitReason != 6 && v.exitReason != 2) { return }
        }
    }

    public func preFaultMemory(vcpu: FD, gpa: UInt64, size: UInt64, flags: UInt64) throws(BackendError)
        -> (gpa: UInt64, size: UInt64)
    {
        // Pre-faulting maps memslot pages: at most what the VM's memslots span.
        let vm = vcpus[real(vcpu)]?.vm
        if vm?.harness != nil, vm?.slots.isEmpty == true {
            // Without TDP the answer depends on whether the VM has any memslot, and the
            // harness's is the only one: the kernel would answer for the harness.
            throw .unsupported("the guest harness's memslot is this VM's only one; KVM_PRE_FAULT_MEMORY would answer for it")
        }
        try budget.charge(min(size, vm?.slots.values.reduce(0, &+) ?? 0), "KVM_PRE_FAULT_MEMORY")
        var range = ckvm_pre_fault_memory()
        range.gpa = gpa
        range.size = size
        range.flags = flags
        try check(ckvm_ioctl_ptr(real(vcpu), CKVM_PRE_FAULT_MEMORY, &range))
        return (range.gpa, range.size)
    }

    /// Compiles `program` into the harness and runs it, turning its port writes into
    /// events and its doorbells and forwarded hypercalls into `handler` calls.
    public func runGuestProgram(vcpu: FD, _ program: GuestProgram, handler: (ConversionRequest) -> UInt64)
        throws(BackendError) -> GuestProgramResult
    {
        guard let v = vcpus[real(vcpu)] else { throw .errno(.EBADF) }
        if program.cpl != 3 {
            throw .unsupported("guest programs run at CPL3 on the kernel backend (kvm-pvm emulates CPL0, and its hypercalls never exit)")
        }
        let h = try harness(for: v)
        if !v.configured {
            try GuestHarness.configure(vcpuFD: v.fd, kvmFD: kvm)
            v.configured = true
        }
        let compiled = try h.compile(program)
        var regs = kvm_regs()
        regs.rip = GuestHarness.programBase
        regs.rsp = GuestHarness.stackTop
        regs.rflags = 0x3002
        try check(ckvm_ioctl_ptr(v.fd, CKVM_SET_REGS, &regs))
        var events: [GuestEvent] = []
        var pendingHypercall: (ConversionRequest, UInt64)?
        while true {
            let r = ckvm_run(v.fd, guestTimeoutMS)
            let reason = v.exitReason
            if r < 0 {
                let errno = Errno(rawValue: -r)
                if reason == 39 && (errno == .EFAULT || errno == .EHWPOISON) {
                    let mf = v.exitUnion.load(as: ckvm_memory_fault.self)
                    return GuestProgramResult(events: events, end: .failed(errno, .memoryFault(flags: mf.flags, gpa: mf.gpa, size: mf.size)))
                }
                return GuestProgramResult(events: events, end: .failed(errno, nil))
            }
            switch reason {
            case 2:  // KVM_EXIT_IO: the program talking to the VMM
                let port = v.exitUnion.load(fromByteOffset: 2, as: UInt16.self)
                let data = v.run + Int(v.exitUnion.load(fromByteOffset: 8, as: UInt64.self))
                // Reports and doorbells carry what they need in the exit and the mailbox;
                // only verify and the hypercall return need the registers.
                var regs = kvm_regs()
                if port == GuestHarness.verifyPort || port == GuestHarness.hypercallReturnPort {
                    try check(ckvm_ioctl_ptr(v.fd, CKVM_GET_REGS, &regs))
                }
                switch port {
                case GuestHarness.donePort:
                    completePendingExit(v)
                    return GuestProgramResult(events: events, end: .completed([]))
                case GuestHarness.reportPort:
                    events.append(.reported(data.load(as: UInt32.self)))
                case GuestHarness.verifyPort:
                    let (gpa, length) = compiled.verifies[Int(regs.rbx)]
                    let equal = regs.rflags & 0x40 != 0 || length == 0
                    events.append(.verified(gpa: gpa, length: length, mismatchAt: equal ? nil : regs.rsi - gpa - 1))
                case GuestHarness.doorbellPort:
                    let box = h.memory + Int(GuestHarness.mailbox)
                    let request = ConversionRequest(
                        gpa: box.load(as: UInt64.self), npages: box.load(fromByteOffset: 8, as: UInt64.self),
                        toPrivate: box.load(fromByteOffset: 16, as: UInt64.self) & 1 != 0, channel: .doorbell)
                    // `in eax`: 32 bits of answer, zero-extended into RAX by the CPU.
                    let result = UInt32(truncatingIfNeeded: handler(request))
                    data.storeBytes(of: result, as: UInt32.self)
                    events.append(.conversion(request, result: UInt64(result)))
                case GuestHarness.hypercallReturnPort:
                    let request = pendingHypercall?.0 ?? ConversionRequest(
                        gpa: regs.rbx, npages: regs.rcx, toPrivate: regs.rdx & 0x10 != 0, channel: .hypercall)
                    events.append(.conversion(request, result: regs.rax))
                    pendingHypercall = nil
                default:
                    completePendingExit(v)
                    return GuestProgramResult(events: events, end: .exit(.other(reason: reason)))
                }
            case 3:  // KVM_EXIT_HYPERCALL: KVM forwarded KVM_HC_MAP_GPA_RANGE
                let u = v.exitUnion
                let request = ConversionRequest(
                    gpa: u.load(fromByteOffset: 8, as: UInt64.self), npages: u.load(fromByteOffset: 16, as: UInt64.self),
                    toPrivate: u.load(fromByteOffset: 24, as: UInt64.self) & 0x10 != 0, channel: .hypercall)
                let result = handler(request)
                u.storeBytes(of: result, toByteOffset: 56, as: UInt64.self)  // hypercall.ret
                pendingHypercall = (request, result)
            case 6:
                let gpa = v.exitUnion.load(as: UInt64.self)
                let len = v.exitUnion.load(fromByteOffset: 16, as: UInt32.self)
                let isWrite = v.exitUnion.load(fromByteOffset: 20, as: UInt8.self) != 0
                completePendingExit(v)
                return GuestProgramResult(events: events, end: .exit(.mmio(gpa: gpa, length: len, isWrite: isWrite)))
            case 8:
                return GuestProgramResult(events: events, end: .exit(.shutdown))
            default:
                return GuestProgramResult(events: events, end: .exit(.other(reason: reason)))
            }
        }
    }
}
#endif
