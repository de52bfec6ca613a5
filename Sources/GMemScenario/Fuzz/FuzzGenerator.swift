import GMemBackend

/// Which ops a campaign may draw: those every backend in the run can perform.
public struct FuzzScope: Hashable, Sendable {
    /// Host processes (fork, exit, steps issued by a child).
    public var processes = false
    /// GUP pins and GUP-fast references.
    public var pins = false
    /// IOMMU domains and DMA.
    public var iommu = false
    /// memory_failure.
    public var memoryFailure = false
    /// check_invariants steps (model only).
    public var invariants = false
    /// Steps whose answer depends on where the real process's other mappings lie: host
    /// accesses and memslots that run past a mapping's end, a munmap under a memslot
    /// (the stale userspace_addr then reaches whatever is mapped there next), memslots
    /// over a vCPU's kvm_run pages (KVM's bytes). Off against a real kernel.
    public var layoutDependent = false
    /// What the kernel backend's guest harness reserves (GPA [0, 32 MiB), GPAs from
    /// 2^47, memslot 32763, and a VM's only memslot for pre-faults) stays out of the
    /// sequences, so a step the kernel side must skip does not end the comparison.
    public var avoidHarness = false

    public init() {}

    /// Everything the model can run.
    public static var modelOnly: FuzzScope {
        var s = FuzzScope()
        (s.processes, s.pins, s.iommu, s.memoryFailure, s.invariants, s.layoutDependent) = (true, true, true, true, true, true)
        return s
    }

    /// What both `backends` can run.
    public static func common(to backends: [any Backend]) -> FuzzScope {
        var s = FuzzScope.modelOnly
        s.invariants = backends.allSatisfy { $0.name == "model" }
        s.layoutDependent = s.invariants
        s.avoidHarness = backends.contains { $0.name == "kernel" }
        for b in backends {
            if b.missing(.processes) != nil { s.processes = false }
            if b.missing(.pins) != nil { s.pins = false }
            if b.missing(.iommu) != nil { s.iommu = false }
            if b.missing(.memoryFailure) != nil { s.memoryFailure = false }
        }
        return s
    }
}

/// Generates one random op sequence as scenario steps (JSON objects, each with
/// `"expect": "any"`), keeping track of the handles earlier steps made so later steps
/// mostly refer to real ones: 1-3 VMs, guest_memfds, memfds, mappings, memslots,
/// vCPUs, guest and host accesses, closes in any order.
public struct FuzzGenerator {
    var r: FuzzRNG
    let scope: FuzzScope
    var steps: [JSON] = []
    var vms: [String] = []
    var vcpus: [String] = []
    /// guest_memfds and memfds with their sizes.
    var files: [(name: String, size: UInt64, gmem: Bool)] = []
    var maps: [(name: String, len: UInt64)] = []
    /// Mappings a memslot uses as userspace_addr, and mappings of vCPU fds.
    var slotMaps: Set<String> = []
    var vcpuMaps: Set<String> = []
    /// Memslots made (VM, slot, gpa, size) so guest accesses land near them.
    var slots: [(vm: String, slot: UInt64, gpa: UInt64, size: UInt64)] = []
    var pins: [String] = []
    var refs: [String] = []
    var domains: [String] = []
    var children: [String] = []
    var counter = 0

    public init(seed: UInt64, scope: FuzzScope) {
        r = FuzzRNG(seed: seed)
        self.scope = scope
    }

    /// A sequence of `count` steps.
    public static func sequence(seed: UInt64, steps count: Int, scope: FuzzScope) -> [JSON] {
        var g = FuzzGenerator(seed: seed, scope: scope)
        while g.steps.count < count { g.step() }
        return g.steps
    }

    mutating func fresh(_ prefix: String) -> String {
        counter += 1
        return "\(prefix)\(counter)"
    }

    mutating func emit(_ op: String, _ fields: KeyValuePairs<String, JSON>, as name: String? = nil) {
        var o = JSONObject()
        o["op"] = .string(op)
        for (k, v) in fields { o[k] = v }
        if let name { o["as"] = .string(name) }
        if !children.isEmpty && FuzzValues.chance(&r, 10) && !["fork", "exit_process", "create_vm", "create_vcpu"].contains(op) {
            o["process"] = .string(FuzzValues.pick(&r, children))
        }
        o["expect"] = .string("any")
        steps.append(.object(o))
    }

    /// An fd operand: usually a handle of the wanted kind, sometimes any other handle
    /// or a raw number (a closed or bogus descriptor).
    mutating func fd(_ preferred: [String]) -> JSON {
        let all = vms + vcpus + files.map(\.name)
        if !preferred.isEmpty && FuzzValues.chance(&r, 85) { return .string(FuzzValues.pick(&r, preferred)) }
        if !all.isEmpty && FuzzValues.chance(&r, 70) { return .string(FuzzValues.pick(&r, all)) }
        return .int(FuzzValues.pick(&r, [-1, 0, 1, 2, 100, 4096, 1 << 31]))
    }

    var gmems: [String] { files.filter(\.gmem).map(\.name) }
    var memfds: [String] { files.filter { !$0.gmem }.map(\.name) }

    func sizeOf(_ name: JSON) -> UInt64 {
        if case .string(let s) = name, let f = files.first(where: { $0.name == s }) { return f.size }
        return 16384
    }

    mutating func step() {
        // Early on, make things; later, use them.
        if vms.isEmpty || (vms.count < 3 && FuzzValues.chance(&r, 4)) { return createVM() }
        if files.isEmpty || FuzzValues.chance(&r, 8) { return FuzzValues.chance(&r, 70) ? createGuestMemfd() : memfdCreate() }
        switch r.next() % 100 {
        case 0..<10: mmap()
        case 10..<20: memslot()
        case 20..<32: guestAccess()
        case 32..<42: hostAccess()
        case 42..<50: fallocate()
        case 50..<57: fileOp()
        case 57..<61: closeSomething()
        case 61..<64: createVCPU()
        case 64..<66: checkExtension()
        case 66: emit("enable_cap", ["vm": fd(vms), "cap": .string("exit_hypercall"),
                                     "args": .int(FuzzValues.pick(&r, [0, 1 << 12, 1 << 13, (1 << 12) | 1] as [UInt64]))])
        case 67..<70: munmapOrMprotect()
        case 70..<74: attributes()
        case 74..<77: convert()
        case 77..<80: preFault()
        case 80..<84 where scope.pins: pinOrGUP()
        case 84..<87 where scope.iommu: iommu()
        case 87..<89 where scope.processes: process()
        case 89..<91 where scope.memoryFailure: memoryFailure()
        case 91..<93 where scope.invariants: emit("check_invariants", [:])
        default: guestAccess()
        }
    }

    mutating func createVM() {
        let name = fresh("vm")
        let type: JSON = FuzzValues.chance(&r, 85) ? .string("default") : .int(FuzzValues.pick(&r, [1, 2, 4, 5, 6, 0x100]))
        emit("create_vm", ["type": type], as: name)
        vms.append(name)
    }

    mutating func createVCPU() {
        let name = fresh("vcpu")
        let id = FuzzValues.chance(&r, 70) ? UInt64(vcpus.count) : FuzzValues.pick(&r, [1, 1023, 4095, 4096, 16383, 16384, 1 << 31])
        emit("create_vcpu", ["vm": fd(vms), "id": .int(id)], as: name)
        vcpus.append(name)
    }

    mutating func createGuestMemfd() {
        let name = fresh("gmem")
        let size = FuzzValues.fileSize(&r)
        var flags: JSON = .array([.string("mmap"), .string("init_shared")])
        switch r.next() % 8 {
        case 0: flags = .array([])
        case 1: flags = .array([.string("mmap")])
        case 2: flags = .array([.string("init_shared")])
        case 3: flags = FuzzValues.hex(FuzzValues.pick(&r, [4, 7, 8, 1 << 63]))
        default: break
        }
        var f: KeyValuePairs<String, JSON> = ["vm": fd(vms), "size": FuzzValues.hex(size), "flags": flags]
        if FuzzValues.chance(&r, 5) { f = ["size": FuzzValues.hex(size), "flags": flags] }  // on /dev/kvm
        emit("create_guest_memfd", f, as: name)
        files.append((name, size, true))
    }

    mutating func memfdCreate() {
        let name = fresh("memfd")
        let size = FuzzValues.chance(&r, 85) ? FuzzValues.pick(&r, [16384, 65536, 1 << 21]) : FuzzValues.fileSize(&r)
        if FuzzValues.chance(&r, 15) {
            emit("memfd_create", ["size": FuzzValues.hex(size), "secret": .bool(true)], as: name)  // memfd_secret(2)
        } else {
            emit("memfd_create", ["size": FuzzValues.hex(size)], as: name)
        }
        files.append((name, size, false))
    }

    mutating func mmap() {
        let name = fresh("map")
        let target = fd(files.map(\.name))
        let size = sizeOf(target)
        let len = FuzzValues.chance(&r, 70) ? size : FuzzValues.length(&r)
        let offset = FuzzValues.chance(&r, 75) ? 0 : FuzzValues.offset(&r, within: size)
        var prot: [JSON] = [.string("read"), .string("write")]
        switch r.next() % 10 {
        case 0: prot = [.string("read")]
        case 1: prot = [.string("read"), .string("write"), .string("exec")]
        case 2: prot = [.string("write")]
        case 3: prot = []
        default: break
        }
        let shared = FuzzValues.chance(&r, 85)
        if FuzzValues.chance(&r, 10) {
            emit("mmap", ["len": FuzzValues.hex(len), "prot": .array(prot), "shared": .bool(shared)], as: name)  // anonymous
        } else {
            emit("mmap", ["fd": target, "offset": FuzzValues.hex(offset), "len": FuzzValues.hex(len), "prot": .array(prot),
                          "shared": .bool(shared)], as: name)
        }
        maps.append((name, len))
        if case .string(let t) = target, vcpus.contains(t) { vcpuMaps.insert(name) }
    }

    mutating func munmapOrMprotect() {
        guard let m = maps.isEmpty ? nil : FuzzValues.pick(&r, maps) else { return mmap() }
        if FuzzValues.chance(&r, 50) && (scope.layoutDependent || !slotMaps.contains(m.name)) {
            emit("munmap", ["map": .string(m.name)])
        } else {
            let prot = FuzzValues.pick(&r, [["read"], ["read", "write"], [], ["read", "exec"], ["write"]])
            emit("mprotect", ["map": .string(m.name), "prot": .array(prot.map { .string($0) })])
        }
    }

    mutating func memslot() {
        let vm = fd(vms)
        let slot: UInt64 = FuzzValues.chance(&r, 85) ? r.next() % 6
            : FuzzValues.pick(&r, (scope.avoidHarness ? [32762, 32764, 0x1_0000 | 1, 0xffff] : [32763, 32764, 0x1_0000 | 1, 0xffff]) as [UInt64])
        if FuzzValues.chance(&r, 12), let s = slots.isEmpty ? nil : FuzzValues.pick(&r, slots) {
            emit("set_user_memory_region2", ["vm": .string(s.vm), "slot": .int(s.slot), "gpa": FuzzValues.hex(s.gpa), "size": .int(0)])
            return
        }
        let gpa: UInt64 = FuzzValues.chance(&r, 85)
            ? FuzzValues.pick(&r, [1 << 30, (1 << 30) + (1 << 21), 2 << 30, 4 << 30, 1 << 33])
            : FuzzValues.pick(&r, FuzzValues.boundaries)
        let gmemName = gmems.isEmpty ? nil : FuzzValues.pick(&r, gmems)
        let useGmem = gmemName != nil && FuzzValues.chance(&r, 75)
        let fileSize = gmemName.map { sizeOf(.string($0)) } ?? 16384
        var size = FuzzValues.chance(&r, 70) ? min(fileSize, 1 << 21) : FuzzValues.length(&r)
        if size == 0 { size = 4096 }
        let offset = FuzzValues.chance(&r, 75) ? 0 : FuzzValues.offset(&r, within: fileSize)
        var flags: [JSON] = useGmem ? [.string("guest_memfd")] : []
        if FuzzValues.chance(&r, 8) { flags.append(.string(FuzzValues.pick(&r, ["readonly", "log_dirty_pages"]))) }
        var uaddr: JSON = .int(0)
        let candidates = scope.layoutDependent ? maps : maps.filter { !vcpuMaps.contains($0.name) }
        if let m = candidates.isEmpty ? nil : FuzzValues.pick(&r, candidates), FuzzValues.chance(&r, 60) {
            uaddr = .string(m.name)
            slotMaps.insert(m.name)
            // Past the mapping's end lies whatever the process mapped next (see `layoutDependent`).
            if !scope.layoutDependent && size > m.len { size = max(m.len & ~4095, 4096) }
        } else if FuzzValues.chance(&r, 10) {
            uaddr = FuzzValues.hex(FuzzValues.pick(&r, [1, 0x1000_0000_0000, (1 << 47) - 4096, 0xffff_8000_0000_0000]))
        }
        let op = FuzzValues.chance(&r, 8) ? "set_user_memory_region" : "set_user_memory_region2"
        if op == "set_user_memory_region2" && useGmem {
            emit(op, ["vm": vm, "slot": .int(slot), "flags": .array(flags), "gpa": FuzzValues.hex(gpa), "size": FuzzValues.hex(size),
                      "userspace_addr": uaddr, "guest_memfd": fd(gmems), "guest_memfd_offset": FuzzValues.hex(offset)])
        } else {
            emit(op, ["vm": vm, "slot": .int(slot), "flags": .array(flags), "gpa": FuzzValues.hex(gpa), "size": FuzzValues.hex(size),
                      "userspace_addr": uaddr])
        }
        if case .string(let v) = vm { slots.append((v, slot, gpa, size)) }
    }

    /// A gpa in or around a memslot (mostly), or a boundary; accesses avoid [0, 32 MiB),
    /// where the kernel backend keeps its guest harness.
    mutating func gpa() -> UInt64 {
        if let s = slots.isEmpty ? nil : FuzzValues.pick(&r, slots), FuzzValues.chance(&r, 85) {
            let pages = max(s.size / 4096, 1)
            switch r.next() % 8 {
            case 0: return s.gpa &+ s.size &- 8
            case 1: return s.gpa &+ s.size
            default: return s.gpa &+ (r.next() % pages) * 4096 &+ (FuzzValues.chance(&r, 20) ? r.next() % 4096 : 0)
            }
        }
        return FuzzValues.pick(&r, [1 << 30, 3 << 30, (1 << 47) - 4096, 1 << 40])
    }

    mutating func guestAccess() {
        guard !vms.isEmpty else { return createVM() }
        let target = !vcpus.isEmpty && FuzzValues.chance(&r, 30) ? ("vcpu", fd(vcpus)) : ("vm", fd(vms))
        let g = gpa()
        let len: UInt64 = FuzzValues.chance(&r, 80) ? 1 + r.next() % 64 : FuzzValues.pick(&r, [0, 4096, 8192, 4097])
        if scope.avoidHarness && (g < 32 << 20 || g > (1 << 47) - 8192) { return }
        if FuzzValues.chance(&r, 50) {
            emit("guest_read", [target.0: target.1, "gpa": FuzzValues.hex(g), "len": .int(len)])
        } else {
            emit("guest_write", [target.0: target.1, "gpa": FuzzValues.hex(g), "bytes": FuzzValues.bytes(&r)])
        }
    }

    mutating func hostAccess() {
        guard let m = maps.isEmpty ? nil : FuzzValues.pick(&r, maps) else { return mmap() }
        let span = min(m.len, 1 << 21)
        let offset = FuzzValues.chance(&r, 85) ? (r.next() % max(span / 4096, 1)) * 4096 + (FuzzValues.chance(&r, 20) ? r.next() % 4096 : 0)
            : FuzzValues.pick(&r, [m.len, m.len &- 1, m.len &+ 4096])
        let len: UInt64 = FuzzValues.chance(&r, 85) ? 1 + r.next() % 64 : FuzzValues.pick(&r, [4096, 8192, 0])
        if !scope.layoutDependent && (offset >= m.len || len > m.len - offset) { return }
        if FuzzValues.chance(&r, 50) {
            emit("host_read", ["map": .string(m.name), "offset": FuzzValues.hex(offset), "len": .int(len)])
        } else {
            emit("host_write", ["map": .string(m.name), "offset": FuzzValues.hex(offset), "bytes": FuzzValues.bytes(&r, max: max(min(len, 64), 1))])
        }
    }

    mutating func fallocate() {
        let target = fd(files.map(\.name))
        let size = sizeOf(target)
        var mode: JSON = FuzzValues.pick(&r, [.array([.string("keep_size")]), .array([.string("keep_size"), .string("punch_hole")])])
        if FuzzValues.chance(&r, 15) { mode = .int(FuzzValues.pick(&r, [0, 2, 0x10, 0x11, 0x80, 0x100, 0x03 | 0x04])) }
        let offset = FuzzValues.offset(&r, within: size)
        let len = FuzzValues.chance(&r, 60) ? min(size, 1 << 21) : FuzzValues.length(&r)
        emit("fallocate", ["fd": target, "mode": mode, "offset": FuzzValues.hex(offset), "len": FuzzValues.hex(len)])
    }

    mutating func fileOp() {
        let target = fd(files.map(\.name))
        let size = sizeOf(target)
        switch r.next() % 8 {
        case 0: emit("fstat", ["fd": target])
        case 1: emit("read", ["fd": target, "len": .int(FuzzValues.pick(&r, [0, 1, 16, 4096]))])
        case 2: emit("write", ["fd": target, "bytes": FuzzValues.bytes(&r)])
        case 3: emit("pread", ["fd": target, "len": .int(FuzzValues.pick(&r, [0, 1, 16, 4096])), "offset": FuzzValues.hex(FuzzValues.offset(&r, within: size))])
        case 4: emit("pwrite", ["fd": target, "bytes": FuzzValues.bytes(&r), "offset": FuzzValues.hex(FuzzValues.offset(&r, within: size))])
        case 5:
            emit("lseek", ["fd": target, "offset": FuzzValues.hex(FuzzValues.offset(&r, within: size)), "whence": .int(r.next() % 6)])
        default:
            let newSize = FuzzValues.chance(&r, 70) ? FuzzValues.pick(&r, [0, size / 2 / 4096 * 4096, size, size &* 2]) : FuzzValues.length(&r)
            emit("ftruncate", ["fd": target, "size": FuzzValues.hex(newSize)])
        }
    }

    mutating func closeSomething() {
        let all = vms + vcpus + files.map(\.name)
        guard !all.isEmpty else { return createVM() }
        emit("close", ["fd": .string(FuzzValues.pick(&r, all))])
    }

    mutating func checkExtension() {
        let cap = FuzzValues.pick(&r, Capability.allCases).rawValue
        if !vms.isEmpty && FuzzValues.chance(&r, 50) {
            emit("check_extension", ["vm": fd(vms), "cap": .string(cap)])
        } else {
            emit("check_extension", ["cap": .string(cap)])
        }
    }

    mutating func attributes() {
        let g = FuzzValues.chance(&r, 80) ? gpa() & ~4095 : gpa()
        let size = FuzzValues.chance(&r, 80) ? 4096 * (1 + r.next() % 4) : FuzzValues.length(&r)
        let attrs: JSON = FuzzValues.chance(&r, 85) ? FuzzValues.pick(&r, [.array([.string("private")]), .array([])]) : .int(FuzzValues.pick(&r, [1, 0x10, 0x18]))
        emit("set_memory_attributes", ["vm": fd(vms), "gpa": FuzzValues.hex(g), "size": FuzzValues.hex(size), "attributes": attrs])
    }

    mutating func convert() {
        let target = fd(gmems)
        let size = sizeOf(target)
        emit("convert", ["fd": target, "offset": FuzzValues.hex(FuzzValues.offset(&r, within: size)),
                         "size": FuzzValues.hex(FuzzValues.chance(&r, 70) ? 4096 : FuzzValues.length(&r)),
                         "to": .string(FuzzValues.chance(&r, 50) ? "private" : "shared")])
    }

    mutating func preFault() {
        if scope.avoidHarness {
            // Only VMs with a memslot of the scenario's: otherwise the harness's is its only one.
            let withSlots = vms.filter { vm in slots.contains { $0.vm == vm } }
            guard let vm = withSlots.isEmpty ? nil : FuzzValues.pick(&r, withSlots) else { return }
            emit("pre_fault_memory", ["vm": .string(vm), "gpa": FuzzValues.hex(gpa() & ~4095), "size": FuzzValues.hex(FuzzValues.length(&r, pages: 4))])
            return
        }
        let target = !vcpus.isEmpty && FuzzValues.chance(&r, 50) ? ("vcpu", fd(vcpus)) : ("vm", fd(vms))
        emit("pre_fault_memory", [target.0: target.1, "gpa": FuzzValues.hex(gpa() & ~4095), "size": FuzzValues.hex(FuzzValues.length(&r, pages: 4))])
    }

    mutating func pinOrGUP() {
        guard let m = maps.isEmpty ? nil : FuzzValues.pick(&r, maps) else { return mmap() }
        let offset = FuzzValues.offset(&r, within: m.len)
        let len = FuzzValues.chance(&r, 80) ? 4096 : FuzzValues.length(&r)
        switch r.next() % 4 {
        case 0 where !pins.isEmpty:
            emit("unpin", ["pin": .string(pins.removeFirst())])
        case 1 where !refs.isEmpty:
            emit("gup_fast_drop", ["ref": .string(refs.removeFirst())])
        case 2:
            let n = fresh("ref")
            emit("gup_fast", ["map": .string(m.name), "offset": FuzzValues.hex(offset), "len": FuzzValues.hex(len)], as: n)
            refs.append(n)
        default:
            let n = fresh("pin")
            emit("pin", ["map": .string(m.name), "offset": FuzzValues.hex(offset), "len": FuzzValues.hex(len),
                         "longterm": .bool(FuzzValues.chance(&r, 50)), "write": .bool(FuzzValues.chance(&r, 70))], as: n)
            pins.append(n)
        }
    }

    mutating func iommu() {
        if domains.isEmpty || FuzzValues.chance(&r, 10) {
            let n = fresh("dom")
            let model = FuzzValues.pick(&r, ["vfio", "hypervisor", "sva"])
            emit("iommu_domain", ["model": .string(model)], as: n)
            domains.append(n)
            return
        }
        let d = JSON.string(FuzzValues.pick(&r, domains))
        let iova = FuzzValues.chance(&r, 80) ? 0x10_0000 + (r.next() % 8) * 4096 : FuzzValues.pick(&r, FuzzValues.boundaries)
        let len = FuzzValues.chance(&r, 70) ? 4096 * (1 + r.next() % 4) : FuzzValues.length(&r)
        switch r.next() % 4 {
        case 0:
            if let m = maps.isEmpty ? nil : FuzzValues.pick(&r, maps), FuzzValues.chance(&r, 60) {
                emit("iommu_map", ["domain": d, "iova": FuzzValues.hex(iova), "map": .string(m.name), "len": FuzzValues.hex(len)])
            } else if !gmems.isEmpty {
                emit("iommu_map", ["domain": d, "iova": FuzzValues.hex(iova), "fd": fd(gmems), "offset": .int(0), "len": FuzzValues.hex(len)])
            }
        case 1: emit("iommu_unmap", ["domain": d, "iova": FuzzValues.hex(iova), "len": FuzzValues.hex(len)])
        case 2: emit("dma_read", ["domain": d, "iova": FuzzValues.hex(iova), "len": .int(1 + r.next() % 64)])
        default: emit("dma_write", ["domain": d, "iova": FuzzValues.hex(iova), "bytes": FuzzValues.bytes(&r)])
        }
    }

    mutating func process() {
        if children.isEmpty || FuzzValues.chance(&r, 60) {
            let n = fresh("child")
            emit("fork", [:], as: n)
            children.append(n)
        } else {
            let c = children.removeFirst()
            steps.append(.object(JSONObject(["op": .string("exit_process"), "process": .string(c), "expect": .string("any")])))
        }
    }

    mutating func memoryFailure() {
        let target = fd(gmems)
        emit("memory_failure", ["fd": target, "offset": FuzzValues.hex(FuzzValues.offset(&r, within: sizeOf(target)))])
    }
}
