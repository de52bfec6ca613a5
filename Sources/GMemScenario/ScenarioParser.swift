import GMemBackend
import GMemModel

/// Reads scenario files into typed steps, checking every op, field, number and
/// handle name before anything runs.
public enum ScenarioParser {
    static let commonFields: Set<String> = ["op", "as", "process", "expect", "expect_value", "expect_bytes", "expect_exit", "comment"]

    static let gmemFlags: [String: UInt64] = [
        "mmap": UAPI.GUEST_MEMFD_FLAG_MMAP, "init_shared": UAPI.GUEST_MEMFD_FLAG_INIT_SHARED,
        "no_direct_map": UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    ]
    static let slotFlags: [String: UInt64] = [
        "log_dirty_pages": UInt64(UAPI.KVM_MEM_LOG_DIRTY_PAGES), "readonly": UInt64(UAPI.KVM_MEM_READONLY),
        "guest_memfd": UInt64(UAPI.KVM_MEM_GUEST_MEMFD),
    ]
    static let fallocModes: [String: UInt64] = [
        "keep_size": 0x01, "punch_hole": 0x02, "no_hide_stale": 0x04, "collapse_range": 0x08,
        "zero_range": 0x10, "insert_range": 0x20, "unshare_range": 0x40, "write_zeroes": 0x80,
    ]
    static let protBits: [String: UInt64] = ["read": 1, "write": 2, "exec": 4]
    static let attributeBits: [String: UInt64] = ["private": UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE]
    static let whences: [String: UInt64] = ["set": 0, "cur": 1, "end": 2, "data": 3, "hole": 4]

    /// Parses the text of `file`.
    public static func parse(text: String, file: String) throws(ScenarioError) -> Scenario {
        let json: JSON
        do {
            json = try JSONParser.parse(text)
        } catch {
            throw ScenarioError(file: file, message: "invalid JSON: \(error)")
        }
        return try parse(json: json, file: file)
    }

    /// Reads a scenario already parsed as JSON (the fuzzer builds its sequences so).
    public static func parse(json: JSON, file: String) throws(ScenarioError) -> Scenario {
        guard case .object(let top) = json else {
            throw ScenarioError(file: file, message: "expected a JSON object with \"name\" and \"steps\"")
        }
        for key in top.keys where !["name", "description", "requires", "policies", "steps", "actors", "catches", "comment"].contains(key) {
            throw ScenarioError(file: file, field: key, message: "unknown top-level field (expected name, description, requires, policies, steps, actors, catches)")
        }
        var binding: BindingOwnership?
        if let p = top["policies"] {
            guard case .object(let o) = p else { throw ScenarioError(file: file, field: "policies", message: "expected an object") }
            for key in o.keys where key != "binding" {
                throw ScenarioError(file: file, field: "policies.\(key)", message: "unknown policy (expected binding)")
            }
            if let b = o["binding"] {
                guard case .string(let s) = b, let v = BindingOwnership(rawValue: s) else {
                    throw ScenarioError(file: file, field: "policies.binding", message: "expected \"file_holds_vm\" or \"memslot_holds_file\"")
                }
                binding = v
            }
        }
        guard case .string(let name)? = top["name"] else {
            throw ScenarioError(file: file, field: "name", message: "missing or not a string")
        }
        var description: String?
        if let d = top["description"] {
            guard case .string(let s) = d else { throw ScenarioError(file: file, field: "description", message: "expected a string") }
            description = s
        }
        let requires = try readNames(top["requires"], as: Feature.self, file: file, field: "requires", what: "feature")
        guard case .array(let rawSteps)? = top["steps"] else {
            throw ScenarioError(file: file, field: "steps", message: "missing or not an array of steps")
        }
        var names: [String: HandleKind] = [:]
        var steps: [Step] = []
        for (index, raw) in rawSteps.enumerated() {
            guard case .object(let obj) = raw else {
                throw ScenarioError(file: file, step: index, message: "a step must be an object with \"op\"")
            }
            var reader = StepReader(obj: obj, file: file, index: index, names: names)
            let step = try reader.readStep()
            if let n = step.name {
                guard let kind = step.op.produces else {
                    throw reader.fail("as", "op '\(step.opName)' returns no handle to name")
                }
                names[n] = kind
            }
            steps.append(step)
        }
        let actors = try readActors(top["actors"], file: file, names: names, firstIndex: steps.count)
        let catches = try readNames(top["catches"], as: Mutant.self, file: file, field: "catches", what: "mutant")
        return Scenario(file: file, name: name, description: description, requires: requires, binding: binding, steps: steps,
                        actors: actors, catches: catches)
    }

    /// A top-level list of names from a closed set (`requires`, `catches`); an unknown
    /// name is an error that lists the known ones.
    static func readNames<T: RawRepresentable & CaseIterable>(_ value: JSON?, as _: T.Type, file: String, field: String, what: String)
        throws(ScenarioError) -> [T] where T.RawValue == String
    {
        guard let value else { return [] }
        let known = T.allCases.map(\.rawValue).joined(separator: ", ")
        guard case .array(let items) = value else {
            throw ScenarioError(file: file, field: field, message: "expected a list of \(what) names (\(known))")
        }
        var out: [T] = []
        for item in items {
            guard case .string(let s) = item, let v = T(rawValue: s) else {
                throw ScenarioError(file: file, field: field, message: "unknown \(what) \(item.rendered) (expected \(known))")
            }
            out.append(v)
        }
        return out
    }

    /// `"actors": [{"name", "program": [steps]}]` for `gmem explore`: the steps read as
    /// scenario steps (numbered on from the setup's), plus `guest_fault`, which the
    /// explorer splits where KVM drops mmu_lock. Each actor sees the setup's names and
    /// its own.
    static func readActors(_ json: JSON?, file: String, names: [String: HandleKind], firstIndex: Int) throws(ScenarioError)
        -> [ActorSpec]
    {
        guard let json else { return [] }
        guard case .array(let items) = json else {
            throw ScenarioError(file: file, field: "actors", message: "expected a list of {\"name\", \"program\"}")
        }
        var index = firstIndex
        var actors: [ActorSpec] = []
        for (i, item) in items.enumerated() {
            guard case .object(let a) = item, case .string(let name)? = a["name"], case .array(let program)? = a["program"],
                a.keys.allSatisfy({ ["name", "program", "comment"].contains($0) })
            else {
                throw ScenarioError(file: file, field: "actors[\(i)]", message: "expected {\"name\": a string, \"program\": a list of steps}")
            }
            var own = names
            var ops: [ActorOp] = []
            for raw in program {
                guard case .object(let obj) = raw else {
                    throw ScenarioError(file: file, step: index, message: "a step must be an object with \"op\"")
                }
                var reader = StepReader(obj: obj, file: file, index: index, names: own)
                if case .string("guest_fault")? = obj["op"] {
                    ops.append(try reader.readGuestFault())
                } else if case .string("pin_user_pages_fast")? = obj["op"] {
                    ops.append(try reader.readGUPFast())
                } else {
                    let step = try reader.readStep()
                    if let n = step.name, let kind = step.op.produces { own[n] = kind }
                    ops.append(.step(step))
                }
                index += 1
            }
            actors.append(ActorSpec(name: name, program: ops))
        }
        return actors
    }
}

extension StepReader {
    /// `{"op": "guest_fault", "vcpu", "gpa", "write"?}`: one stage-2 fault, in two
    /// explorer steps (resolve without mmu_lock; install, or retry if stale).
    mutating func readGuestFault() throws(ScenarioError) -> ActorOp {
        op = "guest_fault"
        let vcpu = try ref("vcpu")
        let gpa = try number("gpa")
        let write = try bool("write") ?? false
        _ = try string("comment")
        try finish()
        return .guestFault(vcpu: vcpu, gpa: gpa, write: write)
    }

    /// `{"op": "pin_user_pages_fast", "map", "offset"?}`: GUP-fast of one page, in
    /// three explorer steps (walk the PTE, grab the pin, recheck the PTE).
    mutating func readGUPFast() throws(ScenarioError) -> ActorOp {
        op = "pin_user_pages_fast"
        guard case .name(let map) = try ref("map", kind: .map) else { throw fail("map", "expected a mapping name") }
        let offset = try optionalNumber("offset") ?? 0
        if offset % UAPI.pageSize != 0 { throw fail("offset", "expected a multiple of 4K") }
        _ = try string("comment")
        try finish()
        return .gupFastPin(map: map, offset: offset)
    }
}

/// Reading one step: its op and fields, typed and checked.
extension StepReader {
    mutating func readStep() throws(ScenarioError) -> Step {
        guard case .string(let opName)? = obj["op"] else { throw fail("op", "missing or not a string") }
        op = opName
        let parsed = try readOp(opName)
        let name = try string("as")
        var process: String?
        if obj["process"] != nil {
            guard case .name(let p) = try ref("process", kind: .process) else { throw fail("process", "expected a process name from fork") }
            process = p
        }
        if case .exitProcess = parsed, process == nil {
            throw fail("process", "exit_process needs \"process\": the forked process that exits (the VMM cannot)")
        }
        var expect = Outcome.ok
        var observe = false
        if let e = try string("expect") {
            switch e {
            case "any": observe = true
            case "ok": expect = .ok
            case "SIGBUS": expect = .sigbus
            case "SIGSEGV": expect = .sigsegv
            case "exit": expect = .exit
            default:
                guard let errno = Errno(name: e) else {
                    throw fail("expect", "expected \"ok\", \"any\", \"SIGBUS\", \"SIGSEGV\", \"exit\" or an errno name (\(Errno.allNames.joined(separator: ", "))), got \"\(e)\"")
                }
                expect = .errno(errno)
            }
        }
        let expectValue = raw("expect_value")
        var expectBytes: [UInt8]?
        if obj["expect_bytes"] != nil { expectBytes = try bytes("expect_bytes") }
        let expectExit = raw("expect_exit")
        if let x = expectExit, case .object = x {} else if expectExit != nil {
            throw fail("expect_exit", "expected an object such as {\"reason\": \"memory_fault\", \"gpa\": \"0xC0000000\"}")
        }
        let comment = try string("comment")
        try finish()
        let namesVCPU = obj["vcpu"] != nil
        if observe && (expectValue != nil || expectBytes != nil || expectExit != nil) {
            throw fail("expect", "\"any\" observes without judging; it cannot stand with expect_value, expect_bytes or expect_exit")
        }
        return Step(
            index: index, opName: opName, op: parsed, name: name, process: process, expect: expect, observe: observe, namesVCPU: namesVCPU,
            expectValue: expectValue, expectBytes: expectBytes, expectExit: expectExit, comment: comment)
    }

    mutating func readOp(_ name: String) throws(ScenarioError) -> Op {
        switch name {
        case "create_vm":
            var type: UInt64 = 0
            if let j = raw("type") {
                if case .string(let s) = j, let t = VMType(rawValue: s) {
                    type = t.number
                } else if let n = NumberSyntax.parse(j) {
                    type = n
                } else {
                    throw fail("type", "expected one of \(VMType.allCases.map(\.rawValue).joined(separator: ", ")) or a number")
                }
            }
            var conversion = ConversionPolicy.attributes
            if let c = try string("conversion") {
                guard let m = ConversionPolicy(rawValue: c) else { throw fail("conversion", "expected \"attributes\" or \"in_place\"") }
                conversion = m
            }
            return .createVM(type: type, conversion: conversion)
        case "create_vcpu":
            return .createVCPU(vm: try ref("vm"), id: try number32("id", default: 0))
        case "check_extension":
            let on = try optionalRef("vm")
            guard let c = try string("cap") else { throw fail("cap", "missing (expected a capability name)") }
            guard let cap = Capability(rawValue: c) else {
                throw fail("cap", "unknown capability \"\(c)\" (expected \(Capability.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            return .checkExtension(on: on, cap: cap)
        case "create_guest_memfd":
            return .createGuestMemfd(on: try optionalRef("vm"), size: try number("size"), flags: try flags("flags", ScenarioParser.gmemFlags))
        case "close":
            return .close(try ref("fd"))
        case "fstat":
            return .fstat(try ref("fd"))
        case "read":
            return .read(try ref("fd"), count: try number("len"))
        case "write":
            return .write(try ref("fd"), try bytes("bytes"))
        case "pread":
            return .pread(try ref("fd"), count: try number("len"), offset: try optionalNumber("offset") ?? 0)
        case "pwrite":
            return .pwrite(try ref("fd"), try bytes("bytes"), offset: try optionalNumber("offset") ?? 0)
        case "lseek":
            let fd = try ref("fd")
            let offset = Int64(bitPattern: try optionalNumber("offset") ?? 0)
            let whence = try flags("whence", ScenarioParser.whences)
            return .lseek(fd, offset: offset, whence: Int32(truncatingIfNeeded: whence))
        case "ftruncate":
            return .ftruncate(try ref("fd"), size: try number("size"))
        case "fallocate":
            let fd = try ref("fd")
            let mode = try flags("mode", ScenarioParser.fallocModes)
            guard mode <= UInt64(UInt32.max) else { throw fail("mode", "does not fit in 32 bits") }
            return .fallocate(fd, mode: UInt32(mode), offset: try number("offset"), length: try number("len"))
        case "memfd_create":
            return .memfdCreate(size: try number("size"), secret: try bool("secret") ?? false)
        case "mmap":
            let fd = try optionalRef("fd")
            let prot = try flags("prot", ScenarioParser.protBits, default: 3)
            guard let shared = try bool("shared") else { throw fail("shared", "missing (true for MAP_SHARED, false for MAP_PRIVATE)") }
            return .mmap(fd: fd, offset: try optionalNumber("offset") ?? 0, length: try number("len"),
                         prot: Protection(rawValue: UInt32(truncatingIfNeeded: prot)), shared: shared)
        case "munmap":
            return .munmap(map: try mapName("map"))
        case "mprotect":
            let map = try mapName("map")
            return .mprotect(map: map, offset: try optionalNumber("offset") ?? 0, length: try optionalNumber("len"),
                             prot: Protection(rawValue: UInt32(truncatingIfNeeded: try flags("prot", ScenarioParser.protBits))))
        case "host_write":
            return .hostWrite(map: try mapName("map"), offset: try optionalNumber("offset") ?? 0, try bytes("bytes"))
        case "host_read":
            return .hostRead(map: try mapName("map"), offset: try optionalNumber("offset") ?? 0, count: try number("len"))
        case "set_user_memory_region2", "set_user_memory_region":
            return try readRegion(version2: name == "set_user_memory_region2")
        case "set_memory_attributes":
            return .setMemoryAttributes(
                vm: try ref("vm"), gpa: try number("gpa"), size: try number("size"),
                attributes: try flags("attributes", ScenarioParser.attributeBits), flags: try optionalNumber("flags") ?? 0)
        case "guest_write":
            return .guestWrite(vcpu: try vcpuRef(), gpa: try number("gpa"), try bytes("bytes"), isPrivate: try bool("private"),
                               vmm: try bool("vmm") ?? false)
        case "guest_read":
            return .guestRead(vcpu: try vcpuRef(), gpa: try number("gpa"), count: try number("len"), isPrivate: try bool("private"),
                              vmm: try bool("vmm") ?? false)
        case "pre_fault_memory":
            return .preFaultMemory(vcpu: try vcpuRef(), gpa: try number("gpa"), size: try number("size"), flags: try optionalNumber("flags") ?? 0)
        case "memory_failure":
            return .memoryFailure(try ref("fd"), offset: try number("offset"))
        case "enable_cap":
            let vm = try ref("vm")
            guard let c = try string("cap"), let cap = Capability(rawValue: c) else {
                throw fail("cap", "expected a capability name such as \"exit_hypercall\"")
            }
            return .enableCap(vm: vm, cap: cap, arg: try optionalNumber("args") ?? 0)
        case "guest_program":
            let vcpu = try vcpuRef()
            guard case .array(let items)? = raw("program") else {
                throw fail("program", "expected a list of guest ops: fill, verify, report, convert")
            }
            var ops: [GuestProgram.Op] = []
            for (i, item) in items.enumerated() { ops.append(try guestOp(item, index: i)) }
            let vmm = try bool("vmm") ?? false
            if vmm && obj["doorbell_result"] != nil { throw fail("doorbell_result", "with \"vmm\": true the VMM's manager answers") }
            let cpl = try optionalNumber("cpl") ?? 3
            guard cpl == 0 || cpl == 3 else { throw fail("cpl", "expected 0 or 3") }
            return .guestProgram(vcpu: vcpu, GuestProgram(ops, cpl: Int(cpl)), doorbellResult: try optionalNumber("doorbell_result") ?? 0, vmm: vmm)
        case "check_invariants":
            return .checkInvariants
        case "vmm_manage":
            let vm = try ref("vm")
            guard let p = try string("policy"), let policy = ConversionPolicy(rawValue: p) else {
                throw fail("policy", "expected \"attributes\" or \"in_place\"")
            }
            guard case .array(let items)? = raw("regions"), !items.isEmpty else { throw fail("regions", "expected a non-empty list") }
            var regions: [RegionRef] = []
            for (i, item) in items.enumerated() {
                guard case .object(let o) = item else { throw fail("regions[\(i)]", "expected an object") }
                for k in o.keys where !["gpa", "size", "guest_memfd", "offset", "shared_backing"].contains(k) {
                    throw fail("regions[\(i)].\(k)", "unknown field (expected gpa, size, guest_memfd, offset, shared_backing)")
                }
                func num(_ k: String) throws(ScenarioError) -> UInt64? {
                    guard let j = o[k] else { return nil }
                    guard let v = NumberSyntax.parse(j) else { throw fail("regions[\(i)].\(k)", "expected a number") }
                    return v
                }
                func fdName(_ k: String) throws(ScenarioError) -> Ref? {
                    guard let j = o[k] else { return nil }
                    guard case .string(let n) = j, names[n] == .fd else { throw fail("regions[\(i)].\(k)", "expected an fd name") }
                    return .name(n)
                }
                guard let gpa = try num("gpa"), let size = try num("size"), let g = try fdName("guest_memfd") else {
                    throw fail("regions[\(i)]", "needs gpa, size and guest_memfd")
                }
                regions.append(RegionRef(gpa: gpa, size: size, guestMemfd: g, offset: try num("offset") ?? 0, sharedBacking: try fdName("shared_backing")))
            }
            let initially = try string("initially") ?? "private"
            guard initially == "private" || initially == "shared" else { throw fail("initially", "expected \"private\" or \"shared\"") }
            return .vmmManage(vm: vm, policy: policy, regions: regions, initiallyPrivate: initially == "private",
                              prefault: try bool("prefault") ?? false)
        case "vmm_convert":
            let vm = try ref("vm")
            guard let to = try string("to"), to == "private" || to == "shared" else { throw fail("to", "expected \"private\" or \"shared\"") }
            return .vmmConvert(vm: vm, gpa: try number("gpa"), size: try number("size"), toPrivate: to == "private")
        case "vmm_listener":
            return .vmmListener(vm: try ref("vm"), domain: try domainName(), map: try mapName("map"), gpaBase: try number("gpa"))
        case "fork":
            return .fork
        case "exit_process":
            return .exitProcess
        case "pkvm_guest":
            return .pkvmGuest(protected: try bool("protected") ?? false)
        case "pkvm_call":
            guard let c = try string("call"), let call = PKVMCall(rawValue: c) else {
                throw fail("call", "expected one of \(PKVMCall.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return .pkvmCall(call, page: try number("page"), guest: try guestName(), gfn: try optionalNumber("gfn") ?? 0,
                             pages: try optionalNumber("pages") ?? 1, prot: try flags("prot", ScenarioParser.protBits, default: 7))
        case "pkvm_host_access", "pkvm_guest_access":
            let guest = try guestName()
            if name == "pkvm_guest_access" && guest == nil { throw fail("guest", "missing (a pkvm_guest name)") }
            let w = try optionalNumber("write")
            if let w, w > 0xff { throw fail("write", "a byte value, 0..255") }
            return .pkvmAccess(page: name == "pkvm_host_access" ? try number("page") : 0, guest: guest,
                               gfn: try optionalNumber("gfn") ?? 0, write: w.map { UInt8($0) })
        case "pkvm_state":
            return .pkvmState(page: try number("page"), guest: try guestName(), gfn: try optionalNumber("gfn") ?? 0)
        case "iommu_domain":
            guard let m = try string("model"), let model = IOMMUModel(rawValue: m) else {
                throw fail("model", "expected \"vfio\", \"hypervisor\", \"nested\" or \"sva\"")
            }
            let vm = try optionalRef("vm")
            if (model == .nested) != (vm != nil) { throw fail("vm", "a nested domain needs \"vm\"; the others take none") }
            return .iommuDomain(model, vm: vm)
        case "iommu_map":
            let domain = try domainName()
            let map = obj["map"] != nil ? try mapName("map") : nil
            let fd = try optionalRef("fd")
            if let gpa = try optionalNumber("gpa") {
                guard map == nil && fd == nil else { throw fail("gpa", "a nested mapping takes \"gpa\" alone") }
                return .iommuMap(domain: domain, iova: try number("iova"), map: nil, fd: nil, offset: gpa, length: try number("len"))
            }
            guard (map == nil) != (fd == nil) else {
                throw fail(map == nil ? "map" : "fd", "give \"map\" (VFIO: host memory), \"fd\" (hypervisor: guest_memfd) or \"gpa\" (nested), one of them")
            }
            return .iommuMap(domain: domain, iova: try number("iova"), map: map, fd: fd,
                             offset: try optionalNumber("offset") ?? 0, length: try number("len"))
        case "iommu_unmap":
            return .iommuUnmap(domain: try domainName(), iova: try number("iova"), length: try number("len"))
        case "dma_read":
            guard let iova = try addressRef("iova") else { throw fail("iova", "missing") }
            return .dmaRead(domain: try domainName(), iova: iova, count: try number("len"))
        case "dma_write":
            guard let iova = try addressRef("iova") else { throw fail("iova", "missing") }
            return .dmaWrite(domain: try domainName(), iova: iova, try bytes("bytes"))
        case "gup_fast":
            return .gupFast(map: try mapName("map"), offset: try optionalNumber("offset") ?? 0, length: try number("len"))
        case "gup_fast_drop":
            guard case .name(let n) = try ref("ref", kind: .ref) else { throw fail("ref", "expected a gup_fast reference name") }
            return .gupFastDrop(ref: n)
        case "convert":
            let fd = try ref("fd")
            guard let to = try string("to"), to == "private" || to == "shared" else { throw fail("to", "expected \"private\" or \"shared\"") }
            return .convert(fd, offset: try number("offset"), size: try number("size"), toPrivate: to == "private")
        case "pin":
            return .pin(map: try mapName("map"), offset: try optionalNumber("offset") ?? 0, length: try number("len"),
                        longterm: try bool("longterm") ?? false, write: try bool("write") ?? true)
        case "unpin":
            guard case .name(let n) = try ref("pin", kind: .pin) else { throw fail("pin", "expected a pin name") }
            return .unpin(pin: n)
        default:
            throw fail("op", "unknown op \"\(name)\" (see docs/scenarios.md for the list)")
        }
    }

    /// One op of a guest program: {"fill": {...}}, {"verify": {...}}, {"report": n},
    /// {"convert": {...}}.
    func guestOp(_ item: JSON, index: Int) throws(ScenarioError) -> GuestProgram.Op {
        let field = "program[\(index)]"
        guard case .object(let o) = item, o.keys.count == 1, let kind = o.keys.first, let body = o[kind] else {
            throw fail(field, "expected an object with one key: fill, verify, report or convert")
        }
        func num(_ key: String, in b: JSONObject) throws(ScenarioError) -> UInt64 {
            guard let j = b[key], let v = NumberSyntax.parse(j) else { throw fail("\(field).\(kind).\(key)", "missing or not a number") }
            return v
        }
        func object() throws(ScenarioError) -> JSONObject {
            guard case .object(let b) = body else { throw fail("\(field).\(kind)", "expected an object") }
            return b
        }
        switch kind {
        case "fill", "verify":
            let b = try object()
            for k in b.keys where !["gpa", "len", "pattern"].contains(k) {
                throw fail("\(field).\(kind).\(k)", "unknown field (expected gpa, len, pattern)")
            }
            guard case .string(let hex)? = b["pattern"], let pattern = BytesSyntax.hexBytes(hex), !pattern.isEmpty else {
                throw fail("\(field).\(kind).pattern", "expected a non-empty hex string")
            }
            let gpa = try num("gpa", in: b)
            let len = try num("len", in: b)
            guard len <= BytesSyntax.maxLength else { throw fail("\(field).\(kind).len", "larger than \(BytesSyntax.maxLength)") }
            return kind == "fill" ? .fill(gpa: gpa, length: len, pattern: pattern) : .verify(gpa: gpa, length: len, pattern: pattern)
        case "report":
            guard let v = NumberSyntax.parse(body), v <= UInt64(UInt32.max) else { throw fail("\(field).report", "expected a 32-bit number") }
            return .report(UInt32(v))
        case "convert":
            let b = try object()
            for k in b.keys where !["gpa", "npages", "to", "via"].contains(k) {
                throw fail("\(field).convert.\(k)", "unknown field (expected gpa, npages, to, via)")
            }
            guard case .string(let to)? = b["to"], to == "private" || to == "shared" else {
                throw fail("\(field).convert.to", "expected \"private\" or \"shared\"")
            }
            var channel = ConversionChannel.doorbell
            if let via = b["via"] {
                guard case .string(let v) = via, let c = ConversionChannel(rawValue: v), c != .memoryFault else {
                    throw fail("\(field).convert.via", "expected \"doorbell\" or \"hypercall\"")
                }
                channel = c
            }
            return .convert(ConversionRequest(gpa: try num("gpa", in: b), npages: try num("npages", in: b), toPrivate: to == "private", channel: channel))
        default:
            throw fail(field, "unknown guest op \"\(kind)\" (expected fill, verify, report or convert)")
        }
    }

    mutating func readRegion(version2: Bool) throws(ScenarioError) -> Op {
        let vm = try ref("vm")
        let id = try number32("slot")
        let asID = try number32("as_id", default: 0)
        guard id <= 0xffff, asID <= 0xffff else { throw fail(id > 0xffff ? "slot" : "as_id", "must fit in 16 bits") }
        let flags = try flags("flags", ScenarioParser.slotFlags)
        guard flags <= UInt64(UInt32.max) else { throw fail("flags", "does not fit in 32 bits") }
        let uaddr = try addressRef("userspace_addr") ?? .absolute(0)
        var gmem: Ref?
        var offset: UInt64 = 0
        if version2 {
            gmem = try optionalRef("guest_memfd")
            offset = try optionalNumber("guest_memfd_offset") ?? 0
        }
        let spec = RegionSpec(
            slot: asID << 16 | id, flags: UInt32(flags), gpa: try number("gpa"), size: try number("size"),
            userspaceAddr: uaddr, guestMemfd: gmem, guestMemfdOffset: offset)
        return .setUserMemoryRegion(vm: vm, spec, version2: version2)
    }
}
