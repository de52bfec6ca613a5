import GMemBackend

/// The model behind the Backend protocol: a `Kernel` value driven one call at a time.
public final class ModelBackend: Backend {
    public let name = "model"
    /// The whole simulated system; a copy is a snapshot.
    public var kernel: Kernel

    /// Check no-leak and no-loss across every call (an O(1) snapshot before, a walk
    /// of the faulted pages after). Off by default: benchmarks drive millions of calls.
    public var checkTransitions = false
    private var transitionViolations: [Violation] = []

    public init(config: ModelConfig = .mainline, checkTransitions: Bool = false) {
        kernel = Kernel(config: config)
        kernel.pkvm.keepHostAccessOnDonate = config.mutants.contains(.pkvmDonateKeepsHostAccess)
        kernel.pkvm.reclaimWithoutScrub = config.mutants.contains(.pkvmReclaimWithoutScrub)
        self.checkTransitions = checkTransitions
    }

    /// Runs `body`, checking the transition invariants around it when asked to.
    private func tracked<T>(_ effect: ContentEffect, _ body: () throws(BackendError) -> T) throws(BackendError) -> T {
        guard checkTransitions else { return try body() }
        let before = kernel
        defer { transitionViolations += Kernel.transitionViolations(before: before, after: kernel, effect: effect) }
        return try body()
    }

    static let kvmRunPages = "a vCPU mapping's kvm_run, PIO and coalesced-MMIO pages hold KVM's bytes, which the model does not keep"

    public func missing(_ feature: Feature) -> String? {
        let c = kernel.config
        switch feature {
        case .swProtected:
            return c.supportedVMTypes & 2 == 0 ? "the modelled host has no sw_protected VMs (--model-config)" : nil
        case .memoryAttributes:
            return c.memoryAttributesIoctl ? nil : "the modelled host has no KVM_SET_MEMORY_ATTRIBUTES (--model-config)"
        case .preFaultMemory:
            return c.tdp ? nil : "the modelled host uses shadow paging: no KVM_PRE_FAULT_MEMORY (--model-config)"
        case .memoryFailure, .pins, .processes, .iommu, .pkvm:
            return nil
        case .noDirectMap:
            return c.noDirectMap ? nil : "the modelled host has no NO_DIRECT_MAP guest_memfd (6.18 lacks it; --model-config next)"
        case .cocoPlatforms:
            return c.supportedVMTypes & 0b11_0000 == 0b11_0000 ? nil : "the modelled host has no snp/tdx VM types (--model-config)"
        case .inPlaceConversion:
            return c.inPlaceConversion ? nil : "the modelled host has no in-place conversion (--model-config)"
        }
    }

    @inline(__always)
    private func run<T>(_ effect: ContentEffect = .preserving, _ body: (inout Kernel) throws(Errno) -> T) throws(BackendError) -> T {
        try tracked(effect) { () throws(BackendError) in
            do throws(Errno) {
                return try body(&kernel)
            } catch {
                if error == .modelLimit {
                    defer { kernel.refusal = nil }
                    throw .unsupported(kernel.refusal ?? "over a model limit")
                }
                throw .errno(error)
            }
        }
    }

    public func checkExtension(on fd: FD?, _ cap: Capability) throws(BackendError) -> UInt64 {
        try run { k throws(Errno) in try k.checkExtension(on: fd?.raw, cap) }
    }
    public func createVM(type: UInt64, conversion: ConversionPolicy) throws(BackendError) -> FD {
        if conversion == .inPlace, let why = missing(.inPlaceConversion) { throw .unsupported(why) }
        return FD(try run { k throws(Errno) in try k.createVM(type: type, conversion: conversion) })
    }
    public func createVCPU(vm: FD, id: UInt32) throws(BackendError) -> FD {
        FD(try run { k throws(Errno) in try k.createVCPU(vm: vm.raw, id: id) })
    }
    public func createGuestMemfd(on fd: FD?, size: UInt64, flags: UInt64) throws(BackendError) -> FD {
        FD(try run { k throws(Errno) in try k.createGuestMemfd(on: fd?.raw, size: size, flags: flags) })
    }

    public func setBindingOwnership(_ policy: BindingOwnership) throws(BackendError) {
        kernel.config.bindingOwnership = policy
    }
    public func memfdCreate(size: UInt64, secret: Bool) throws(BackendError) -> FD {
        FD(try run { k throws(Errno) in try k.memfdCreate(size: size, secret: secret) })
    }
    public func close(_ fd: FD) throws(BackendError) {
        try run { k throws(Errno) in try k.close(fd.raw) }
    }
    public func fstat(_ fd: FD) throws(BackendError) -> FileStat {
        try run { k throws(Errno) in try k.fstat(fd.raw) }
    }
    public func read(_ fd: FD, count: UInt64) throws(BackendError) -> [UInt8] {
        try run { k throws(Errno) in try k.read(fd.raw, count: count) }
    }
    public func write(_ fd: FD, _ bytes: [UInt8]) throws(BackendError) -> UInt64 {
        try run(.writes) { k throws(Errno) in try k.write(fd.raw, bytes) }
    }
    public func pread(_ fd: FD, count: UInt64, offset: UInt64) throws(BackendError) -> [UInt8] {
        try run { k throws(Errno) in try k.pread(fd.raw, count: count, offset: offset) }
    }
    public func pwrite(_ fd: FD, _ bytes: [UInt8], offset: UInt64) throws(BackendError) -> UInt64 {
        try run(.writes) { k throws(Errno) in try k.pwrite(fd.raw, bytes, offset: offset) }
    }
    public func lseek(_ fd: FD, offset: Int64, whence: Int32) throws(BackendError) -> UInt64 {
        try run { k throws(Errno) in try k.lseek(fd.raw, offset: offset, whence: whence) }
    }
    public func ftruncate(_ fd: FD, size: UInt64) throws(BackendError) {
        try run(.destructive) { k throws(Errno) in try k.ftruncate(fd.raw, size: size) }
    }
    public func fallocate(_ fd: FD, mode: UInt32, offset: UInt64, length: UInt64) throws(BackendError) {
        try run(.destructive) { k throws(Errno) in try k.fallocate(fd.raw, mode: mode, offset: offset, length: length) }
    }
    public func mmap(fd: FD?, offset: UInt64, length: UInt64, prot: Protection, shared: Bool) throws(BackendError)
        -> Mapping
    {
        try run { k throws(Errno) in try k.mmap(fd: fd?.raw, offset: offset, length: length, prot: prot, shared: shared) }
    }
    public func mprotect(address: UInt64, length: UInt64, prot: Protection) throws(BackendError) {
        try run { k throws(Errno) in try k.mprotect(address: address, length: length, prot: prot) }
    }

    public func munmap(_ mapping: Mapping) throws(BackendError) {
        try run { k throws(Errno) in try k.munmap(mapping) }
    }
    public func hostWrite(address: UInt64, bytes: [UInt8]) throws(BackendError) -> HostAccess {
        if kernel.touchesKVMRunPages(address: address, count: UInt64(bytes.count)) { throw .unsupported(Self.kvmRunPages) }
        return try run(.writes) { k in k.hostAccess(address: address, count: UInt64(bytes.count), write: bytes) }
    }
    public func hostRead(address: UInt64, count: UInt64) throws(BackendError) -> HostAccess {
        if let why = Limits.transferRefusal(count, limit: kernel.config.transferLimit, what: "a host read") { throw .unsupported(why) }
        if kernel.touchesKVMRunPages(address: address, count: count) { throw .unsupported(Self.kvmRunPages) }
        return try run { k in k.hostAccess(address: address, count: count, write: nil) }
    }
    public func setUserMemoryRegion2(vm: FD, _ region: UserMemoryRegion2) throws(BackendError) {
        try run { k throws(Errno) in try k.setUserMemoryRegion2(vm: vm.raw, region) }
    }
    public func setUserMemoryRegion(vm: FD, _ region: UserMemoryRegion2) throws(BackendError) {
        try run { k throws(Errno) in try k.setUserMemoryRegion(vm: vm.raw, region) }
    }
    public func setMemoryAttributes(vm: FD, address: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError)
    {
        try run { k throws(Errno) in
            try k.setMemoryAttributes(vm: vm.raw, address: address, size: size, attributes: attributes, flags: flags)
        }
    }
    public func guestAccess(vcpu: FD, _ access: GuestAccess) throws(BackendError) -> GuestOutcome {
        if access.isPrivate != nil, kernel.vmType(ofVCPU: vcpu.raw)?.accessCarriesPrivate != true {
            // default and sw_protected VMs take private/shared from the attributes.
            throw .unsupported("this platform decides private/shared from memory attributes; `private` needs a platform with a shared-GPA bit (snp, tdx)")
        }
        if case .read(let n) = access.kind, let why = Limits.transferRefusal(n, limit: kernel.config.transferLimit, what: "a guest read") {
            throw .unsupported(why)
        }
        let effect: ContentEffect = if case .write = access.kind { .writes } else { .preserving }
        return try run(effect) { k throws(Errno) in try k.guestAccess(vcpu: vcpu.raw, access) }
    }
    public func preFaultMemory(vcpu: FD, gpa: UInt64, size: UInt64, flags: UInt64) throws(BackendError)
        -> (gpa: UInt64, size: UInt64)
    {
        try run { k throws(Errno) in try k.preFaultMemory(vcpu: vcpu.raw, gpa: gpa, size: size, flags: flags) }
    }
    public func enableCap(vm: FD, _ cap: Capability, _ arg: UInt64) throws(BackendError) {
        try run { k throws(Errno) in try k.enableCap(vm: vm.raw, cap, arg) }
    }

    /// Interprets the program op by op. Each op is its own call into the kernel, so a
    /// conversion handler may call back into this backend between them.
    public func runGuestProgram(vcpu: FD, _ program: GuestProgram, handler: (ConversionRequest) -> UInt64)
        throws(BackendError) -> GuestProgramResult
    {
        var events: [GuestEvent] = []
        for op in program.ops {
            switch op {
            case .fill(let gpa, let length, let pattern):
                let outcome = try guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: .write(GuestProgram.expand(pattern, to: length))))
                if outcome != .completed([]) { return GuestProgramResult(events: events, end: outcome) }
            case .verify(let gpa, let length, let pattern):
                let outcome = try guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: .read(count: length)))
                guard case .completed(let bytes) = outcome else { return GuestProgramResult(events: events, end: outcome) }
                let expected = GuestProgram.expand(pattern, to: length)
                let at = zip(bytes, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
                events.append(.verified(gpa: gpa, length: length, mismatchAt: at.map(UInt64.init)))
            case .report(let value):
                events.append(.reported(value))
            case .convert(let request):
                let result: UInt64
                switch request.channel {
                case .doorbell, .memoryFault:
                    // The doorbell answers through `in eax`: 32 bits, zero-extended.
                    result = UInt64(UInt32(truncatingIfNeeded: handler(request)))
                case .hypercall:
                    // KVM answers itself unless the guest is at CPL0 and the exit is
                    // enabled; then KVM_EXIT_HYPERCALL reaches the VMM (the handler).
                    let forwarded = try run { k throws(Errno) in try k.exitsOnMapGPARange(vcpu: vcpu.raw) }
                    result = request.kvmHypercallAnswer(cpl: program.cpl, exitEnabled: forwarded) ?? handler(request)
                }
                events.append(.conversion(request, result: result))
            }
        }
        return GuestProgramResult(events: events, end: .completed([]))
    }

    public func setGuestMemfdAttributes(fd: FD, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError) -> ConversionOutcome
    {
        try run { k in k.setGuestMemfdAttributes(fd.raw, offset: offset, size: size, attributes: attributes, flags: flags) }
    }

    public func pin(address: UInt64, length: UInt64, longterm: Bool, write: Bool) throws(BackendError) -> ObjectHandle {
        ObjectHandle(id: try run { k throws(Errno) in try k.pin(address: address, length: length, longterm: longterm, write: write) })
    }

    public func unpin(_ pin: ObjectHandle) throws(BackendError) {
        try run { k throws(Errno) in try k.unpin(pin.id) }
    }

    public func gupFastReference(address: UInt64, length: UInt64) throws(BackendError) -> ObjectHandle {
        ObjectHandle(id: try run { k throws(Errno) in try k.gupFastReference(address: address, length: length) })
    }

    public func dropSpeculativeReferences(_ handle: ObjectHandle) throws(BackendError) {
        try run { k throws(Errno) in try k.dropSpeculativeRefs(handle.id) }
    }

    public func fork() throws(BackendError) -> ProcessHandle {
        ProcessHandle(pid: kernel.fork())
    }

    public func switchProcess(_ process: ProcessHandle) throws(BackendError) {
        try run { k throws(Errno) in try k.switchProcess(process.pid) }
    }

    public func exitProcess(_ process: ProcessHandle) throws(BackendError) {
        try run { k throws(Errno) in try k.exitProcess(process.pid) }
    }

    public func createIOMMUDomain(_ model: IOMMUModel, vm: FD?) throws(BackendError) -> ObjectHandle {
        // (an SVA domain binds the calling process)
        ObjectHandle(id: try run { k throws(Errno) in try k.createIOMMUDomain(model, vm: vm?.raw) })
    }

    public func iommuMap(domain: ObjectHandle, iova: UInt64, address: UInt64?, fd: FD?, offset: UInt64, length: UInt64)
        throws(BackendError)
    {
        try run { k throws(Errno) in
            if k.iommuDomains[domain.id]?.model == .nested {
                try k.nestedMap(domain: domain.id, iova: iova, gpa: offset, length: length)
            } else if let address {
                try k.vfioMapDMA(domain: domain.id, iova: iova, address: address &+ offset, length: length)
            } else if let fd {
                try k.hypervisorIOMMUMap(domain: domain.id, iova: iova, fd: fd.raw, offset: offset, length: length)
            } else {
                throw .EINVAL
            }
        }
    }

    public func iommuUnmap(domain: ObjectHandle, iova: UInt64, length: UInt64) throws(BackendError) {
        try run { k throws(Errno) in try k.iommuUnmap(domain: domain.id, iova: iova, length: length) }
    }

    public func dma(domain: ObjectHandle, iova: UInt64, write: [UInt8]?, count: UInt64) throws(BackendError) -> [UInt8] {
        try run(write == nil ? .preserving : .writes) { k throws(Errno) in try k.dma(domain: domain.id, iova: iova, write: write, count: count) }
    }

    public func pkvmCreateGuest(protected: Bool) throws(BackendError) -> ObjectHandle {
        ObjectHandle(id: kernel.pkvm.createGuest(protected: protected))
    }

    public func pkvmCall(_ call: PKVMCall, _ args: PKVMArgs) throws(BackendError) {
        try run { k throws(Errno) in try k.pkvm.perform(call, args) }
    }

    public func pkvmAccess(page: UInt64, guest: ObjectHandle?, gfn: UInt64, write: UInt8?) throws(BackendError) -> UInt8 {
        try run(write == nil ? .preserving : .writes) { k throws(Errno) in
            if let guest { return try k.pkvm.guestAccess(guest.id, gfn: gfn, write: write) }
            return try k.pkvm.hostAccess(page, write: write)
        }
    }

    public func pkvmState(page: UInt64, guest: ObjectHandle?, gfn: UInt64) throws(BackendError) -> [String: PageState] {
        let p = kernel.pkvm
        if page >= p.pages { throw .errno(.EINVAL) }
        var out = ["host": p.hostState(page), "hyp": p.hypState(page)]
        if let guest { out["guest"] = p.guestState(guest.id, gfn: gfn) }
        return out
    }

    /// The transition invariants broken since the last report (the explorer's
    /// per-step check), clearing them.
    public func takeTransitionViolations() -> [Violation] {
        defer { transitionViolations = [] }
        return transitionViolations
    }

    /// The state invariants now, and the transition invariants broken since the last
    /// report.
    public func checkInvariants() throws(BackendError) -> [Violation] {
        defer { transitionViolations = [] }
        return transitionViolations + kernel.checkSystemInvariants()
    }

    public func memoryFailure(fd: FD, offset: UInt64) throws(BackendError) {
        try run(.destructive) { k throws(Errno) in try k.memoryFailure(fd.raw, offset: offset) }
    }
}
