import GMemBackend
import GMemVMM

/// Runs scenarios on one backend, step by step, through the Backend protocol only.
public final class ScenarioRunner {
    public let backend: any Backend
    private var fds: [String: FD] = [:]
    private var vcpuNames: Set<String> = []
    private var maps: [String: Mapping] = [:]
    private var pins: [String: ObjectHandle] = [:]
    private var refs: [String: ObjectHandle] = [:]
    private var domains: [String: ObjectHandle] = [:]
    private var guests: [String: ObjectHandle] = [:]
    /// The VMM side per VM (by the VM's name): its manager and request handler.
    private var vmms: [Ref: GuestRequestHandler] = [:]
    private var processes: [String: ProcessHandle] = [:]
    /// The process the backend is issuing calls as.
    private var current = ProcessHandle.vmm
    private var implicitVCPUs: [Ref: FD] = [:]
    /// Handles whose creating step did not produce them, with the step index.
    private var missing: [String: Int] = [:]

    public init(backend: any Backend) {
        self.backend = backend
    }

    /// The names steps have bound, as one value: the explorer saves it with each
    /// state and restores it before a step, so a `close` on one path does not forget
    /// the name on another. (The VMM-side handlers are objects and are not included:
    /// actor programs do not use them.)
    struct Handles: Hashable {
        var fds: [String: FD]
        var vcpuNames: Set<String>
        var maps: [String: Mapping]
        var pins: [String: ObjectHandle]
        var refs: [String: ObjectHandle]
        var domains: [String: ObjectHandle]
        var guests: [String: ObjectHandle]
        var processes: [String: ProcessHandle]
        var current: ProcessHandle
        var implicitVCPUs: [Ref: FD]
        var missing: [String: Int]
    }

    var handles: Handles {
        get {
            Handles(fds: fds, vcpuNames: vcpuNames, maps: maps, pins: pins, refs: refs, domains: domains, guests: guests,
                    processes: processes, current: current, implicitVCPUs: implicitVCPUs, missing: missing)
        }
        set {
            (fds, vcpuNames, maps, pins, refs, domains, guests) =
                (newValue.fds, newValue.vcpuNames, newValue.maps, newValue.pins, newValue.refs, newValue.domains, newValue.guests)
            (processes, current, implicitVCPUs, missing) = (newValue.processes, newValue.current, newValue.implicitVCPUs, newValue.missing)
        }
    }

    /// Runs every step of `scenario`, calling `report` after each. A scenario that
    /// requires a feature the backend lacks has every step skipped with the reason.
    public func run(_ scenario: Scenario, report: (StepReport) -> Void) -> Summary {
        var summary = Summary()
        var lacking = Self.lacking(scenario, on: [backend])
        if lacking == nil, let why = applyPolicies(scenario) { lacking = why }
        for step in scenario.steps {
            let r = lacking.map { StepReport.skipped(step, $0, backend: backend.name) } ?? run(step)
            summary.add(r)
            report(r)
        }
        return summary
    }

    /// Puts the scenario's policies in force; why not, if the backend cannot.
    func applyPolicies(_ scenario: Scenario) -> String? {
        guard let b = scenario.binding else { return nil }
        do {
            try backend.setBindingOwnership(b)
            return nil
        } catch {
            switch error {
            case .unsupported(let why): return "policy binding \(b.rawValue): \(backend.name): \(why)"
            case .errno(let e): return "policy binding \(b.rawValue): \(e)"
            }
        }
    }

    /// Why one of `backends` cannot run `scenario`, or nil.
    static func lacking(_ scenario: Scenario, on backends: [any Backend]) -> String? {
        for f in scenario.requires {
            for b in backends {
                if let why = b.missing(f) { return "requires \(f.rawValue): \(b.name): \(why)" }
            }
        }
        return nil
    }

    struct Skip: Error { var reason: String }

    public func run(_ step: Step) -> StepReport {
        let observation: Observation
        do {
            observation = try execute(step)
        } catch {
            if let n = step.name { missing[n] = step.index }
            return StepReport(index: step.index, op: step.opName, status: .skipped, observation: nil,
                              message: error.reason, backend: backend.name)
        }
        if let n = step.name, observation.result != .ok {
            missing[n] = step.index
        }
        let problems = Self.check(step, observation)
        return StepReport(
            index: step.index, op: step.opName, status: problems.isEmpty ? .passed : .failed,
            observation: observation, message: problems.isEmpty ? nil : problems.joined(separator: "; "),
            backend: backend.name)
    }

    // MARK: Handles

    func fd(_ ref: Ref) throws(Skip) -> FD {
        switch ref {
        case .raw(let r): return FD(r)
        case .name(let n):
            if let fd = fds[n] { return fd }
            if let step = missing[n] { throw Skip(reason: "handle '\(n)' was not created (step \(step))") }
            throw Skip(reason: "handle '\(n)' is not open")
        }
    }

    func pkvmGuest(_ name: String) throws(Skip) -> ObjectHandle {
        if let g = guests[name] { return g }
        throw Skip(reason: missing[name].map { "pKVM guest '\(name)' was not created (step \($0))" } ?? "no pKVM guest '\(name)'")
    }

    func domain(_ name: String) throws(Skip) -> ObjectHandle {
        if let d = domains[name] { return d }
        throw Skip(reason: missing[name].map { "IOMMU domain '\(name)' was not created (step \($0))" } ?? "no IOMMU domain '\(name)'")
    }

    func mapping(_ name: String) throws(Skip) -> Mapping {
        if let m = maps[name] { return m }
        if let step = missing[name] { throw Skip(reason: "mapping '\(name)' was not created (step \(step))") }
        throw Skip(reason: "mapping '\(name)' is not mapped")
    }

    /// Whether the step being executed named its target with `vcpu`.
    private var stepNamesVCPU = false

    /// The vCPU a guest access runs on: what `vcpu` names (KVM_RUN on it, whatever fd
    /// it is: a VM fd gets the kernel's ENOTTY), or vCPU 0 of the VM `vm` names,
    /// created once.
    func vcpu(_ ref: Ref) throws(Skip) -> Result<FD, Errno> {
        if stepNamesVCPU { return .success(try fd(ref)) }
        if case .name(let n) = ref, vcpuNames.contains(n) { return .success(try fd(ref)) }
        if let v = implicitVCPUs[ref] { return .success(v) }
        let vm = try fd(ref)
        do {
            let v = try backend.createVCPU(vm: vm, id: 0)
            implicitVCPUs[ref] = v
            return .success(v)
        } catch {
            switch error {
            case .errno(let e): return .failure(e)
            case .unsupported(let why): throw Skip(reason: why)
            }
        }
    }

    func address(_ a: AddressRef) throws(Skip) -> UInt64 {
        switch a {
        case .absolute(let v): return v
        case .map(let m, let off): return try mapping(m).address &+ off
        }
    }

    // MARK: Execution

    /// Runs a backend call; errnos become results, `unsupported` becomes a skip.
    func call(_ body: () throws(BackendError) -> Observation) throws(Skip) -> Observation {
        do {
            return try body()
        } catch {
            switch error {
            case .errno(let e): return Observation(result: .errno(e))
            case .unsupported(let why): throw Skip(reason: why)
            }
        }
    }

    func bind(_ step: Step, _ fd: FD, isVCPU: Bool = false) -> Observation {
        if let n = step.name {
            fds[n] = fd
            missing[n] = nil
            if isVCPU { vcpuNames.insert(n) }
        }
        return Observation(result: .ok, value: .object(JSONObject(["fd": .int(fd.raw)])))
    }

    func execute(_ step: Step) throws(Skip) -> Observation {
        let b = backend
        stepNamesVCPU = step.namesVCPU
        defer { stepNamesVCPU = false }
        var target = ProcessHandle.vmm
        if let p = step.process {
            guard let h = processes[p] else {
                throw Skip(reason: missing[p].map { "process '\(p)' was not created (step \($0))" } ?? "process '\(p)' has exited")
            }
            target = h
        }
        if target != current {
            do {
                try b.switchProcess(target)
            } catch {
                switch error {
                case .errno(let e): return Observation(result: .errno(e))
                case .unsupported(let why): throw Skip(reason: why)
                }
            }
            current = target
        }
        switch step.op {
        case .fork:
            return try call { () throws(BackendError) in
                let child = try b.fork()
                if let n = step.name {
                    processes[n] = child
                    missing[n] = nil
                }
                return Observation(result: .ok, value: .object(JSONObject(["pid": .int(child.pid)])))
            }
        case .exitProcess:
            return try call { () throws(BackendError) in
                try b.exitProcess(target)
                if let n = step.process { processes[n] = nil }
                current = .vmm
                return Observation(result: .ok)
            }
        case .gupFast(let name, let offset, let length):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                let r = try b.gupFastReference(address: m.address &+ offset, length: length)
                if let n = step.name {
                    refs[n] = r
                    missing[n] = nil
                }
                return Observation(result: .ok)
            }
        case .pkvmGuest(let protected):
            return try call { () throws(BackendError) in
                let g = try b.pkvmCreateGuest(protected: protected)
                if let n = step.name {
                    guests[n] = g
                    missing[n] = nil
                }
                return Observation(result: .ok)
            }
        case .pkvmCall(let c, let page, let guest, let gfn, let pages, let prot):
            let g = try guest.map { n throws(Skip) in try pkvmGuest(n) }
            return try call { () throws(BackendError) in
                try b.pkvmCall(c, PKVMArgs(page: page, guest: g?.id, gfn: gfn, pages: pages, prot: prot))
                return Observation(result: .ok)
            }
        case .pkvmAccess(let page, let guest, let gfn, let write):
            let g = try guest.map { n throws(Skip) in try pkvmGuest(n) }
            return try call { () throws(BackendError) in
                let v = try b.pkvmAccess(page: page, guest: g, gfn: gfn, write: write)
                return Observation(result: .ok, value: .object(JSONObject(["value": .int(v)])))
            }
        case .pkvmState(let page, let guest, let gfn):
            let g = try guest.map { n throws(Skip) in try pkvmGuest(n) }
            return try call { () throws(BackendError) in
                let s = try b.pkvmState(page: page, guest: g, gfn: gfn)
                var o = JSONObject()
                for k in ["host", "hyp", "guest"] { if let v = s[k] { o[k] = .string(v.rawValue) } }
                return Observation(result: .ok, value: .object(o))
            }
        case .iommuDomain(let model, let vmRef):
            let vm = try vmRef.map { r throws(Skip) in try fd(r) }
            return try call { () throws(BackendError) in
                let d = try b.createIOMMUDomain(model, vm: vm)
                if let n = step.name {
                    domains[n] = d
                    missing[n] = nil
                }
                return Observation(result: .ok)
            }
        case .iommuMap(let dname, let iova, let map, let fdRef, let offset, let length):
            let d = try domain(dname)
            let address = try map.map { m throws(Skip) in try mapping(m).address }
            let f = try fdRef.map { r throws(Skip) in try fd(r) }
            return try call { () throws(BackendError) in
                try b.iommuMap(domain: d, iova: iova, address: address, fd: f, offset: offset, length: length)
                return Observation(result: .ok)
            }
        case .iommuUnmap(let dname, let iova, let length):
            let d = try domain(dname)
            return try call { () throws(BackendError) in
                try b.iommuUnmap(domain: d, iova: iova, length: length)
                return Observation(result: .ok)
            }
        case .dmaRead(let dname, let iovaRef, let count):
            let d = try domain(dname)
            let iova = try address(iovaRef)
            return try call { () throws(BackendError) in Self.bytesRead(try b.dma(domain: d, iova: iova, write: nil, count: count)) }
        case .dmaWrite(let dname, let iovaRef, let bytes):
            let d = try domain(dname)
            let iova = try address(iovaRef)
            return try call { () throws(BackendError) in
                _ = try b.dma(domain: d, iova: iova, write: bytes, count: UInt64(bytes.count))
                return Observation(result: .ok)
            }
        case .gupFastDrop(let name):
            guard let r = refs[name] else { throw Skip(reason: "reference '\(name)' is not held") }
            return try call { () throws(BackendError) in
                try b.dropSpeculativeReferences(r)
                refs[name] = nil
                return Observation(result: .ok)
            }
        case .createVM(let type, let conversion):
            return try call { () throws(BackendError) in bind(step, try b.createVM(type: type, conversion: conversion)) }
        case .createVCPU(let vm, let id):
            let v = try fd(vm)
            return try call { () throws(BackendError) in bind(step, try b.createVCPU(vm: v, id: id), isVCPU: true) }
        case .checkExtension(let on, let cap):
            let f = try on.map { r throws(Skip) in try fd(r) }
            return try call { () throws(BackendError) in
                Observation(result: .ok, value: .int(try b.checkExtension(on: f, cap)))
            }
        case .createGuestMemfd(let on, let size, let flags):
            let v = try on.map { r throws(Skip) in try fd(r) }
            return try call { () throws(BackendError) in
                bind(step, try b.createGuestMemfd(on: v, size: size, flags: flags))
            }
        case .memfdCreate(let size, let secret):
            return try call { () throws(BackendError) in bind(step, try b.memfdCreate(size: size, secret: secret)) }
        case .close(let ref):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                try b.close(f)
                if case .name(let n) = ref {
                    // A closed name stays resolvable, to an fd that is never valid.
                    fds[n] = FD(-1)
                }
                return Observation(result: .ok)
            }
        case .fstat(let ref):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                let st = try b.fstat(f)
                return Observation(result: .ok, value: .object(JSONObject([
                    "size": .int(st.size), "blksize": .int(st.blksize), "blocks": .int(st.blocks),
                ])))
            }
        case .read(let ref, let count):
            let f = try fd(ref)
            return try call { () throws(BackendError) in Self.bytesRead(try b.read(f, count: count)) }
        case .pread(let ref, let count, let offset):
            let f = try fd(ref)
            return try call { () throws(BackendError) in Self.bytesRead(try b.pread(f, count: count, offset: offset)) }
        case .write(let ref, let bytes):
            let f = try fd(ref)
            return try call { () throws(BackendError) in Observation(result: .ok, value: .int(try b.write(f, bytes))) }
        case .pwrite(let ref, let bytes, let offset):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                Observation(result: .ok, value: .int(try b.pwrite(f, bytes, offset: offset)))
            }
        case .lseek(let ref, let offset, let whence):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                Observation(result: .ok, value: .int(try b.lseek(f, offset: offset, whence: whence)))
            }
        case .ftruncate(let ref, let size):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                try b.ftruncate(f, size: size)
                return Observation(result: .ok)
            }
        case .fallocate(let ref, let mode, let offset, let length):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                try b.fallocate(f, mode: mode, offset: offset, length: length)
                return Observation(result: .ok)
            }
        case .mmap(let ref, let offset, let length, let prot, let shared):
            let f = try ref.map { r throws(Skip) in try fd(r) }
            return try call { () throws(BackendError) in
                let m = try b.mmap(fd: f, offset: offset, length: length, prot: prot, shared: shared)
                if let n = step.name {
                    maps[n] = m
                    missing[n] = nil
                }
                return Observation(result: .ok, value: .object(JSONObject(["addr": .int(m.address), "len": .int(m.length)])))
            }
        case .mprotect(let name, let offset, let length, let prot):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                try b.mprotect(address: m.address &+ offset, length: length ?? m.length, prot: prot)
                return Observation(result: .ok)
            }
        case .munmap(let name):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                try b.munmap(m)
                maps[name] = nil
                missing[name] = step.index
                return Observation(result: .ok)
            }
        case .hostWrite(let name, let offset, let bytes):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                var o = Self.host(try b.hostWrite(address: m.address &+ offset, bytes: bytes), base: m.address)
                if o.result == .ok { (o.value, o.bytes) = (nil, nil) }  // a store returns nothing
                return o
            }
        case .hostRead(let name, let offset, let count):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                Self.host(try b.hostRead(address: m.address &+ offset, count: count), base: m.address)
            }
        case .setUserMemoryRegion(let vm, let spec, let v2):
            let v = try fd(vm)
            var region = UserMemoryRegion2(
                slot: spec.slot, flags: spec.flags, guestPhysAddr: spec.gpa, memorySize: spec.size,
                userspaceAddr: try address(spec.userspaceAddr), guestMemfdOffset: spec.guestMemfdOffset)
            if let g = spec.guestMemfd { region.guestMemfd = UInt32(bitPattern: try fd(g).raw) }
            return try call { () throws(BackendError) in
                if v2 { try b.setUserMemoryRegion2(vm: v, region) } else { try b.setUserMemoryRegion(vm: v, region) }
                return Observation(result: .ok)
            }
        case .setMemoryAttributes(let vm, let gpa, let size, let attributes, let flags):
            let v = try fd(vm)
            return try call { () throws(BackendError) in
                try b.setMemoryAttributes(vm: v, address: gpa, size: size, attributes: attributes, flags: flags)
                return Observation(result: .ok)
            }
        case .guestWrite(let ref, let gpa, let bytes, let isPrivate, let vmm):
            return try guest(ref, GuestAccess(gpa: gpa, kind: .write(bytes), isPrivate: isPrivate), vmm: vmm)
        case .guestRead(let ref, let gpa, let count, let isPrivate, let vmm):
            return try guest(ref, GuestAccess(gpa: gpa, kind: .read(count: count), isPrivate: isPrivate), vmm: vmm)
        case .preFaultMemory(let ref, let gpa, let size, let flags):
            let v: FD
            switch try vcpu(ref) {
            case .success(let fd): v = fd
            case .failure(let e): return Observation(result: .errno(e))
            }
            return try call { () throws(BackendError) in
                let left = try b.preFaultMemory(vcpu: v, gpa: gpa, size: size, flags: flags)
                return Observation(result: .ok, value: .object(JSONObject(["gpa": .int(left.gpa), "size": .int(left.size)])))
            }
        case .memoryFailure(let ref, let offset):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                try b.memoryFailure(fd: f, offset: offset)
                return Observation(result: .ok)
            }
        case .enableCap(let vm, let cap, let arg):
            let v = try fd(vm)
            return try call { () throws(BackendError) in
                try b.enableCap(vm: v, cap, arg)
                return Observation(result: .ok)
            }
        case .vmmManage(let vm, let policy, let regionRefs, let initiallyPrivate, let prefault):
            let v = try fd(vm)
            var regions: [ManagedRegion] = []
            for r in regionRefs {
                regions.append(ManagedRegion(gpa: r.gpa, size: r.size, gmem: try fd(r.guestMemfd), gmemOffset: r.offset,
                                             sharedBacking: try r.sharedBacking.map { x throws(Skip) in try fd(x) }))
            }
            let manager = ConversionManager(backend: b, vm: v, policy: policy, regions: regions, initiallyPrivate: initiallyPrivate)
            if prefault {
                switch try vcpu(vm) {
                case .success(let c): manager.prefaultVCPU = c
                case .failure(let e): return Observation(result: .errno(e))
                }
            }
            vmms[vm] = GuestRequestHandler(manager: manager)
            return Observation(result: .ok)
        case .vmmConvert(let vm, let gpa, let size, let toPrivate):
            guard let h = vmms[vm] else { throw Skip(reason: "no vmm_manage for this VM") }
            do {
                try h.manager.convert(gpa: gpa, size: size, toPrivate: toPrivate)
                return Observation(result: .ok)
            } catch {
                return Observation(result: .errno(error.errno), value: .object(JSONObject([
                    "gpa": .int(error.gpa), "stage": .string(error.stage.rawValue), "who": .string(error.who),
                ])))
            }
        case .vmmListener(let vm, let dname, let mapName, let gpaBase):
            guard let h = vmms[vm] else { throw Skip(reason: "no vmm_manage for this VM") }
            let d = try domain(dname)
            let m = try mapping(mapName)
            do {
                try h.manager.register(IOMMUListener(name: dname, backend: b, domain: d, hostAddress: m.address, gpaBase: gpaBase))
                return Observation(result: .ok)
            } catch {
                return Observation(result: .errno(error.errno))
            }
        case .guestProgram(let ref, let program, let doorbellResult, let vmm):
            let v: FD
            switch try vcpu(ref) {
            case .success(let fd): v = fd
            case .failure(let e): return Observation(result: .errno(e))
            }
            var handler: GuestRequestHandler?
            if vmm {
                // The VMM of the VM the step names (a vCPU step names its VM's manager by the vCPU's VM name).
                guard let h = vmms[ref] ?? vmms.values.first else { throw Skip(reason: "\"vmm\": true needs vmm_manage first") }
                handler = h
            }
            return try call { () throws(BackendError) in
                let result = try b.runGuestProgram(vcpu: v, program) { r in handler?.handle(r) ?? doorbellResult }
                var o = Observation(result: .ok, value: .object(JSONObject(["events": .array(result.events.map(Self.render))])))
                switch result.end {
                case .completed: break
                case .exit(let x):
                    o.result = .exit
                    o.exit = Self.render(x)
                case .failed(let e, let x):
                    o.result = .errno(e)
                    o.exit = x.map(Self.render)
                }
                return o
            }
        case .checkInvariants:
            return try call { () throws(BackendError) in
                let violations = try b.checkInvariants().map(\.json)
                return Observation(result: .ok, value: .object(JSONObject(["violations": .array(violations)])))
            }
        case .convert(let ref, let offset, let size, let toPrivate):
            let f = try fd(ref)
            return try call { () throws(BackendError) in
                let r = try b.setGuestMemfdAttributes(
                    fd: f, offset: offset, size: size, attributes: toPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0)
                var o = Observation(result: r.errno.map { .errno($0) } ?? .ok)
                if r.errno == .EAGAIN { o.value = .object(JSONObject(["error_offset": .int(r.errorOffset)])) }
                return o
            }
        case .pin(let name, let offset, let length, let longterm, let write):
            let m = try mapping(name)
            return try call { () throws(BackendError) in
                let p = try b.pin(address: m.address &+ offset, length: length, longterm: longterm, write: write)
                if let n = step.name {
                    pins[n] = p
                    missing[n] = nil
                }
                return Observation(result: .ok)
            }
        case .unpin(let name):
            guard let p = pins[name] else {
                throw Skip(reason: missing[name].map { "pin '\(name)' was not taken (step \($0))" } ?? "pin '\(name)' is not held")
            }
            return try call { () throws(BackendError) in
                try b.unpin(p)
                pins[name] = nil
                return Observation(result: .ok)
            }
        }
    }

    /// With `vmm`, a memory-fault exit goes to the VMM's manager as an implicit
    /// conversion and the vCPU runs again (a few times at most: each page of the
    /// access may need one).
    func guest(_ ref: Ref, _ access: GuestAccess, vmm: Bool = false) throws(Skip) -> Observation {
        let v: FD
        switch try vcpu(ref) {
        case .success(let fd): v = fd
        case .failure(let e): return Observation(result: .errno(e))
        }
        let b = backend
        let handler = vmm ? vmms[ref] : nil
        if vmm && handler == nil { throw Skip(reason: "\"vmm\": true needs vmm_manage for this VM first") }
        return try call { () throws(BackendError) in
            var outcome = try b.guestAccess(vcpu: v, access)
            var retries = 0
            while let h = handler, case .failed(_, let exit?) = outcome, retries < 16, h.handleMemoryFault(exit) {
                outcome = try b.guestAccess(vcpu: v, access)
                retries += 1
            }
            switch outcome {
            case .completed(let bytes):
                if case .read = access.kind { return Self.bytesRead(bytes) }
                return Observation(result: .ok)
            case .exit(let exit):
                return Observation(result: .exit, exit: Self.render(exit))
            case .failed(let errno, let exit):
                return Observation(result: .errno(errno), exit: exit.map(Self.render))
            }
        }
    }
}
