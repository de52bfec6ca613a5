import GMemBackend
import GMemScenario
import Testing

@testable import GMemModel

/// The kernel's validation rules as tables: each row is one input and the errno
/// mainline returns for it (nil: success).

struct CreateCase: Sendable, CustomTestStringConvertible {
    var type: VMType
    var size: UInt64
    var flags: UInt64
    var errno: Errno?
    var testDescription: String { "\(type.rawValue) size \(size) flags \(flags) -> \(errno?.name ?? "ok")" }
}

struct FallocateCase: Sendable, CustomTestStringConvertible {
    var mode: UInt32
    var offset: UInt64
    var length: UInt64
    var errno: Errno?
    var testDescription: String { "mode \(mode) off \(offset) len \(length) -> \(errno?.name ?? "ok")" }
}

struct MmapCase: Sendable, CustomTestStringConvertible {
    var flags: UInt64
    var offset: UInt64
    var length: UInt64
    var prot: Protection
    var shared: Bool
    var errno: Errno?
    var testDescription: String {
        "gmem flags \(flags) off \(offset) len \(length) prot \(prot.rawValue) shared \(shared) -> \(errno?.name ?? "ok")"
    }
}

struct SlotCase: Sendable, CustomTestStringConvertible {
    var name: String
    var region: UserMemoryRegion2
    /// Use the test's guest_memfd fd for the region's guest_memfd field.
    var useGmem = true
    var errno: Errno?
    var testDescription: String { "\(name) -> \(errno?.name ?? "ok")" }
}

@Suite("Rule tables")
struct RuleTableTests {
    static let createCases: [CreateCase] = {
        var cases: [CreateCase] = []
        for size: UInt64 in [0, 1, 4095, 4097, 8191, 0x1200, 1 << 63, UInt64.max, 0 &- 4096] {
            cases.append(CreateCase(type: .default, size: size, flags: 0, errno: .EINVAL))
        }
        for size: UInt64 in [4096, 8192, 2 * M, G, 1 << 40, 1 << 62, (1 << 63) - 4096] {
            cases.append(CreateCase(type: .default, size: size, flags: 0, errno: nil))
            cases.append(CreateCase(type: .default, size: size, flags: 3, errno: nil))
        }
        for bit in 0..<64 {
            let flags = UInt64(1) << bit
            cases.append(CreateCase(type: .default, size: 4096, flags: flags, errno: bit < 2 ? nil : .EINVAL))
            // sw_protected (x86 mainline): MMAP only; the same for the SNP- and TDX-like platforms.
            cases.append(CreateCase(type: .swProtected, size: 4096, flags: flags, errno: bit == 0 ? nil : .EINVAL))
            cases.append(CreateCase(type: .snp, size: 4096, flags: flags, errno: bit == 0 ? nil : .EINVAL))
        }
        // Flags are checked before the size.
        cases.append(CreateCase(type: .default, size: 1, flags: 4, errno: .EINVAL))
        return cases
    }()

    @Test(arguments: createCases)
    func createGuestMemfd(_ c: CreateCase) throws {
        var k = Kernel()
        let vm = try k.createVM(type: c.type.number)
        #expect(errnoOf { () throws(Errno) in try k.createGuestMemfd(on: vm, size: c.size, flags: c.flags) } == c.errno)
    }

    static let fallocateCases: [FallocateCase] = {
        let p: UInt64 = 4096
        let t = 4 * p
        var cases: [FallocateCase] = [
            // guest_memfd_test.c, test_fallocate()
            .init(mode: KEEP, offset: 0, length: t, errno: nil),
            .init(mode: KEEP | PUNCH, offset: p - 1, length: p, errno: .EINVAL),
            .init(mode: KEEP, offset: t, length: p, errno: .EINVAL),
            .init(mode: KEEP, offset: t + p, length: p, errno: .EINVAL),
            .init(mode: KEEP | PUNCH, offset: t, length: p, errno: nil),
            .init(mode: KEEP | PUNCH, offset: t + p, length: p, errno: nil),
            .init(mode: KEEP | PUNCH, offset: p, length: p - 1, errno: .EINVAL),
            .init(mode: KEEP | PUNCH, offset: p, length: p, errno: nil),
            .init(mode: KEEP, offset: p, length: p, errno: nil),
            // VFS precedence (host probe, section B)
            .init(mode: KEEP, offset: 0, length: 0, errno: .EINVAL),
            .init(mode: KEEP, offset: 1 << 63, length: p, errno: .EINVAL),
            .init(mode: KEEP, offset: 0, length: 1 << 63, errno: .EINVAL),
            .init(mode: 0, offset: 1, length: p, errno: .EOPNOTSUPP),
            .init(mode: PUNCH, offset: 0, length: p, errno: .EOPNOTSUPP),
            .init(mode: KEEP, offset: 0x7fff_ffff_ffff_f001, length: 0x2000, errno: .EFBIG),
            .init(mode: KEEP, offset: 1, length: 1 << 30, errno: .EINVAL),
            .init(mode: KEEP, offset: 0xff000, length: 0x2000, errno: .EINVAL),
        ]
        // Every mode byte: only KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE succeed.
        for mode in UInt32(0)...0xff where mode != KEEP && mode != KEEP | PUNCH {
            cases.append(.init(mode: mode, offset: 0, length: p, errno: .EOPNOTSUPP))
        }
        // The punch-hole alignment table of test_invalid_punch_hole().
        for (o, l) in [(0, 1), (0, p - 1), (0, p + 1), (1, 1), (1, p - 1), (1, p), (1, p + 1), (p, 1), (p, p - 1), (p, p + 1)] {
            cases.append(.init(mode: KEEP | PUNCH, offset: o, length: l, errno: .EINVAL))
        }
        return cases
    }()

    @Test(arguments: fallocateCases)
    func fallocate(_ c: FallocateCase) throws {
        var k = Kernel()
        let (_, gmem) = try k.vmWithGmem(size: 4 * 4096)
        #expect(errnoOf { () throws(Errno) in try k.fallocate(gmem, mode: c.mode, offset: c.offset, length: c.length) } == c.errno)
    }

    static let mmapCases: [MmapCase] = [
        .init(flags: 0, offset: 0, length: 16 * K, prot: [.read, .write], shared: true, errno: .ENODEV),
        .init(flags: 0, offset: 0, length: 4 * K, prot: [.read], shared: false, errno: .ENODEV),
        .init(flags: INIT_SHARED, offset: 0, length: 4 * K, prot: [.read], shared: true, errno: .ENODEV),
        .init(flags: MMAP, offset: 0, length: 16 * K, prot: [.read, .write], shared: false, errno: .EINVAL),
        .init(flags: MMAP, offset: 0, length: 16 * K, prot: [.read], shared: false, errno: .EINVAL),
        .init(flags: MMAP, offset: 0, length: 16 * K, prot: [.read, .exec], shared: true, errno: .EPERM),
        .init(flags: 0, offset: 0, length: 16 * K, prot: [.exec], shared: true, errno: .EPERM),
        .init(flags: MMAP, offset: 100, length: 4 * K, prot: [.read], shared: true, errno: .EINVAL),
        .init(flags: MMAP, offset: 0, length: 0, prot: [.read], shared: true, errno: .EINVAL),
        .init(flags: MMAP, offset: 4 * K, length: 4 * K, prot: [.read], shared: true, errno: nil),
        .init(flags: MMAP, offset: 16 * K, length: 4 * K, prot: [.read], shared: true, errno: nil),
        .init(flags: MMAP, offset: 0, length: 64 * K, prot: [.read, .write], shared: true, errno: nil),
        .init(flags: MMAP | INIT_SHARED, offset: 0, length: 16 * K, prot: [.read, .write], shared: true, errno: nil),
    ]

    @Test(arguments: mmapCases)
    func mmap(_ c: MmapCase) throws {
        var k = Kernel()
        let (_, gmem) = try k.vmWithGmem(size: 16 * K, flags: c.flags)
        #expect(errnoOf { () throws(Errno) in
            try k.mmap(fd: gmem, offset: c.offset, length: c.length, prot: c.prot, shared: c.shared)
        } == c.errno)
    }

    static let slotCases: [SlotCase] = {
        let gm = UAPI.KVM_MEM_GUEST_MEMFD
        func r(_ slot: UInt32 = 1, flags: UInt32 = UAPI.KVM_MEM_GUEST_MEMFD, gpa: UInt64 = G, size: UInt64 = 2 * M,
               uaddr: UInt64 = 0, off: UInt64 = 0) -> UserMemoryRegion2 {
            UserMemoryRegion2(slot: slot, flags: flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: uaddr, guestMemfdOffset: off)
        }
        return [
            .init(name: "baseline", region: r(), errno: nil),
            .init(name: "gmem|log_dirty", region: r(flags: gm | UAPI.KVM_MEM_LOG_DIRTY_PAGES), errno: .EINVAL),
            .init(name: "gmem|readonly", region: r(flags: gm | UAPI.KVM_MEM_READONLY), errno: .EINVAL),
            .init(name: "unknown flag bit 3", region: r(flags: 1 << 3), errno: .EINVAL),
            .init(name: "readonly without gmem", region: r(flags: UAPI.KVM_MEM_READONLY), useGmem: false, errno: nil),
            .init(name: "unaligned size", region: r(size: 2 * M - 1), errno: .EINVAL),
            .init(name: "unaligned gpa", region: r(gpa: G + 1), errno: .EINVAL),
            .init(name: "unaligned userspace_addr", region: r(uaddr: 0x1001), errno: .EINVAL),
            .init(name: "kernel userspace_addr", region: r(uaddr: 0xffff_8000_0000_0000), errno: .EINVAL),
            .init(name: "userspace_addr crossing TASK_SIZE", region: r(uaddr: (1 << 47) - 4096), errno: .EINVAL),
            .init(name: "unaligned offset", region: r(off: 2048), errno: .EINVAL),
            .init(name: "offset wraps", region: r(off: 0 &- 4096), errno: .EINVAL),
            .init(name: "offset 2^63", region: r(off: 1 << 63), errno: .EINVAL),
            .init(name: "offset past EOF", region: r(off: 8 * M), errno: .EINVAL),
            .init(name: "range crosses EOF", region: r(off: 7 * M), errno: .EINVAL),
            .init(name: "slot 32763", region: r(32763), errno: nil),
            .init(name: "slot 32764", region: r(32764), errno: .EINVAL),
            .init(name: "as_id 1", region: r(1 << 16 | 1), errno: .EINVAL),
            .init(name: "gpa wraps", region: r(gpa: 0 &- 4096, size: 8 * K), errno: .EINVAL),
            .init(name: "too many pages", region: r(flags: 0, gpa: 0, size: 1 << 43, uaddr: 4096), useGmem: false, errno: .EINVAL),
            .init(name: "gpa 2^48 - 4K", region: r(gpa: (1 << 48) - 4096, size: 4096), errno: nil),
            .init(name: "gpa 2^52", region: r(gpa: 1 << 52, size: 4096), errno: .EINVAL),
            .init(name: "delete of a missing slot", region: r(size: 0), errno: .EINVAL),
            .init(name: "closed guest_memfd fd", region: r(), useGmem: false, errno: .EBADF),
        ]
    }()

    @Test(arguments: slotCases)
    func memslotValidation(_ c: SlotCase) throws {
        var k = Kernel()
        let (vm, gmem) = try k.vmWithGmem(size: 8 * M, flags: MMAP)
        var region = c.region
        region.guestMemfd = c.useGmem ? UInt32(gmem) : 4000
        #expect(errnoOf { () throws(Errno) in try k.setUserMemoryRegion2(vm: vm, region) } == c.errno)
        k.checkInvariants()
    }

    @Test("check_extension values per VM type", arguments: [
        (VMType?.none, Capability.guestMemfdFlags, UInt64(3)),
        (.default, .guestMemfdFlags, 3), (.swProtected, .guestMemfdFlags, 1),
        (nil, .memoryAttributes, 8), (.default, .memoryAttributes, 0), (.swProtected, .memoryAttributes, 8),
        (nil, .guestMemfd, 1), (.default, .guestMemfd, 1), (nil, .vmTypes, 0x33), (nil, .nrMemslots, 32764),
        (nil, .exitHypercall, 0x1000), (.default, .preFaultMemory, 1),
    ])
    func capabilities(type: VMType?, cap: Capability, value: UInt64) throws {
        var k = Kernel()
        let fd = try type.map { t throws(Errno) in try k.createVM(type: t.number) }
        #expect(try k.checkExtension(on: fd, cap) == value)
    }

    @Test func noDirectMapIsOfferedOnlyByTheNextProfile() throws {
        var k = Kernel()
        let vm = try k.createVM(type: 0)
        #expect(errnoOf { () throws(Errno) in try k.createGuestMemfd(on: vm, size: 4096, flags: UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP) } == .EINVAL)
        var n = Kernel(config: .next)
        let vm2 = try n.createVM(type: 0)
        #expect(try n.checkExtension(on: vm2, .guestMemfdFlags) == 7)
        _ = try n.createGuestMemfd(on: vm2, size: 4096, flags: 7)
    }

    /// Linux 6.18's bind bug: the offset + size check wraps as a signed loff_t. The
    /// pvm-host profile (6.18) reproduces it; mainline refuses the offset.
    @Test(arguments: [(ModelConfig.mainline, Errno.EINVAL as Errno?), (ModelConfig.pvmHost, nil)])
    func bindOffsetNear2To63(_ config: ModelConfig, _ expected: Errno?) throws {
        var k = Kernel(config: config)
        let (vm, gmem) = try k.vmWithGmem(size: 2 * M, flags: MMAP | INIT_SHARED)
        let region = UserMemoryRegion2(slot: 1, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 16 * K,
                                       userspaceAddr: 0, guestMemfdOffset: (1 << 63) - 4096, guestMemfd: UInt32(gmem))
        #expect(errnoOf { () throws(Errno) in try k.setUserMemoryRegion2(vm: vm, region) } == expected)
    }

    /// The kernel-bug scenarios pass on the profile of the kernel that has the bug.
    @Test func kernelBugScenariosPassOnTheirProfile() throws {
        for path in scenarioFiles(repositoryRoot + "/scenarios/kernel-bugs") {
            let scenario = try ScenarioParser.parse(text: readFile(path) ?? "", file: path)
            var failures: [String] = []
            _ = ScenarioRunner(backend: ModelBackend(config: .pvmHost, checkTransitions: true)).run(scenario) { r in
                if r.status != .passed { failures.append("step \(r.index) \(r.op): \(r.message ?? "")") }
            }
            #expect(failures.isEmpty, "\(path): \(failures)")
        }
    }

    /// Linux 6.12 as measured on the reference kernel: no guest_memfd flags (flag 1 is
    /// EINVAL, mmap is ENODEV), KVM_CAP_GUEST_MEMFD and MEMORY_ATTRIBUTES 0 on a default
    /// VM although KVM_CREATE_GUEST_MEMFD works there, VM_TYPES 3, attributes as mainline.
    @Test func linux612ProfileMatchesTheReferenceKernel() throws {
        var k = Kernel(config: .linux612)
        #expect(try k.checkExtension(on: nil, .vmTypes) == 3)
        #expect(try k.checkExtension(on: nil, .guestMemfd) == 1)
        #expect(try k.checkExtension(on: nil, .memoryAttributes) == UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        #expect(try k.checkExtension(on: nil, .guestMemfdFlags) == 0)
        let vm = try k.createVM(type: 0)
        #expect(try k.checkExtension(on: vm, .guestMemfd) == 0)
        #expect(try k.checkExtension(on: vm, .memoryAttributes) == 0)
        #expect(errnoOf { () throws(Errno) in try k.createGuestMemfd(on: vm, size: 2 * M, flags: MMAP) } == .EINVAL)
        let gmem = try k.createGuestMemfd(on: vm, size: 2 * M, flags: 0)
        #expect(errnoOf { () throws(Errno) in try k.mmap(fd: gmem, offset: 0, length: 4096, prot: [.read, .write], shared: true) } == .ENODEV)
        let sw = try k.createVM(type: VMType.swProtected.number)
        #expect(try k.checkExtension(on: sw, .guestMemfd) == 1)
        #expect(errnoOf { () throws(Errno) in try k.setMemoryAttributes(vm: sw, address: 0, size: 4096, attributes: 1, flags: 0) } == .EINVAL)
        #expect(errnoOf { () throws(Errno) in
            try k.setMemoryAttributes(vm: sw, address: G, size: 4096, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        } == nil)
        // Mainline (6.18) differs exactly there.
        var m = Kernel(config: .mainline)
        let mvm = try m.createVM(type: 0)
        #expect(try m.checkExtension(on: mvm, .guestMemfd) == 1)
        #expect(try m.checkExtension(on: nil, .guestMemfdFlags) != 0)
        _ = try m.createGuestMemfd(on: mvm, size: 2 * M, flags: MMAP | INIT_SHARED)
    }

    @Test func pvmHostProfileMatchesTheProbe() throws {
        var k = Kernel(config: .pvmHost)
        #expect(errnoOf { () throws(Errno) in try k.createVM(type: 1) } == .EINVAL)
        let vm = try k.createVM(type: 0)
        #expect(try k.checkExtension(on: vm, .memoryAttributes) == 0)
        #expect(errnoOf { () throws(Errno) in try k.setMemoryAttributes(vm: vm, address: 0, size: 4096, attributes: 0, flags: 0) } == .ENOTTY)
        #expect(errnoOf { () throws(Errno) in try k.createVCPU(vm: vm, id: 4096) } == .EINVAL, "KVM_MAX_VCPU_IDS is 4096 here")
        #expect(errnoOf { () throws(Errno) in try k.createVCPU(vm: vm, id: 4095) } == nil)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        // Measured on this host: no memslot at all, ENOSPC; with one, EOPNOTSUPP.
        #expect(errnoOf { () throws(Errno) in try k.preFaultMemory(vcpu: vcpu, gpa: 0, size: 4096, flags: 0) } == .ENOSPC)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(slot: 1, flags: 0, guestPhysAddr: 1 << 30, memorySize: 1 << 16, userspaceAddr: 0))
        #expect(errnoOf { () throws(Errno) in try k.preFaultMemory(vcpu: vcpu, gpa: 0, size: 4096, flags: 0) } == .EOPNOTSUPP)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(slot: 1, flags: 0, guestPhysAddr: 1 << 30, memorySize: 0, userspaceAddr: 0))
        #expect(errnoOf { () throws(Errno) in try k.preFaultMemory(vcpu: vcpu, gpa: 0, size: 4096, flags: 0) } == .EOPNOTSUPP,
                "a VM that had a memslot stays EOPNOTSUPP after deleting it")
    }
}
