#if os(Linux)
import CKVM
import GMemBackend
import Glibc

/// The guest side of the kernel backend: what a real vCPU needs to perform one
/// guest access, kept in a helper memslot the backend owns.
///
/// Layout of the helper memslot (GPA 0, `size` bytes, ordinary anonymous memory):
///
///     0x1000  GDT: null, kernel code/data, user data (0x1b), user code (0x23), TSS (0x28)
///     0x2000  code: rep movsb; out 0x10, al; jmp $
///     0x3000  TSS; the user stack ends at 0x3ff0
///     0x10000 page-table pool (PML4 first); identity map, 2 MiB user pages, built lazily
///     0x200000.. bounce buffer
///
/// The guest runs at CPL3 in 64-bit mode with IOPL 3: on kvm-pvm hosts that is the
/// only mode that executes natively, and it works unchanged on VMX and SVM. On
/// kvm-pvm the helper slot has to sit at GPA 0 (reference/host-kernel-probe.md,
/// addendum), so the backend reserves [0, size) in every VM that has run guest code.
final class GuestHarness {
    static let size: UInt64 = 32 << 20
    static let gdtBase: UInt64 = 0x1000
    static let codeBase: UInt64 = 0x2000
    static let tssBase: UInt64 = 0x3000
    static let stackTop: UInt64 = 0x3ff0
    static let pageTablePool: Range<UInt64> = 0x10000..<0x100000
    static let bounce: Range<UInt64> = 0x200000..<size
    static let donePort: UInt16 = 0x10
    /// A second program: the hypercall instruction, then `out 0x11` with RAX as the
    /// hypercall's return value.
    static let hypercallCode: UInt64 = codeBase + 0x20
    static let hypercallPort: UInt16 = 0x11
    /// Guest programs (`compile`): code at programBase, their data in the bounce buffer.
    static let programBase: UInt64 = 0x100000
    static let programLimit: UInt64 = 0x200000
    static let doorbellPort: UInt16 = 0x12
    static let verifyPort: UInt16 = 0x13
    static let reportPort: UInt16 = 0x14
    static let hypercallReturnPort: UInt16 = 0x15
    /// The doorbell's mailbox: gpa, npages, flags (u64 each), written by the guest and
    /// read by the VMM straight from the helper memory, with no register ioctl.
    static let mailbox: UInt64 = 0x3f00
    /// Identity mapping reaches the top of the canonical lower half.
    static let mappableLimit: UInt64 = 1 << 47

    let memory: UnsafeMutableRawPointer
    let slot: UInt32
    private var nextTablePage: UInt64 = pageTablePool.lowerBound + 0x1000
    private var mappedGiB: Set<UInt64> = []

    static var pml4: UInt64 { pageTablePool.lowerBound }

    /// Maps the helper memory and registers it as memslot `slot` of `vmFD`.
    init(vmFD: Int32, slot: UInt32) throws(BackendError) {
        let addr = ckvm_mmap(OwnMappings.hint(Self.size), Self.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard addr > 0, let p = UnsafeMutableRawPointer(bitPattern: addr) else { throw .errno(Errno(rawValue: Int32(-addr))) }
        memory = p
        self.slot = slot
        var region = ckvm_userspace_memory_region2()
        region.slot = slot
        region.guest_phys_addr = 0
        region.memory_size = Self.size
        region.userspace_addr = UInt64(UInt(bitPattern: addr))
        let r = ckvm_ioctl_ptr(vmFD, CKVM_SET_USER_MEMORY_REGION2, &region)
        if r < 0 {
            _ = ckvm_munmap(region.userspace_addr, Self.size)
            throw .errno(Errno(rawValue: Int32(-r)))
        }
        writeGDT()
        writeCode()
        // The first GiB (which holds this slot) is always mapped.
        _ = ensureMapped(0..<1)
    }

    deinit {
        _ = ckvm_munmap(UInt64(UInt(bitPattern: memory)), Self.size)
    }

    private func store64(_ offset: UInt64, _ value: UInt64) {
        memory.storeBytes(of: value.littleEndian, toByteOffset: Int(offset), as: UInt64.self)
    }

    private func load64(_ offset: UInt64) -> UInt64 {
        memory.load(fromByteOffset: Int(offset), as: UInt64.self)
    }

    private func writeGDT() {
        // Flat descriptors: limit 0xfffff, G=1. Access byte P|DPL|S|type.
        let entries: [UInt64] = [
            0,
            0x00af_9b00_0000_ffff,  // 0x08 kernel code, L=1
            0x00cf_9300_0000_ffff,  // 0x10 kernel data
            0x00cf_f300_0000_ffff,  // 0x18 user data, DPL 3
            0x00af_fb00_0000_ffff,  // 0x20 user code, DPL 3, L=1
        ]
        for (i, e) in entries.enumerated() { store64(Self.gdtBase + UInt64(i) * 8, e) }
        // 0x28: a 64-bit available TSS at tssBase, limit 0x67 (16 bytes in long mode).
        let base = Self.tssBase
        let low: UInt64 = 0x67 | (base & 0xffffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56
        store64(Self.gdtBase + 5 * 8, low)
        store64(Self.gdtBase + 6 * 8, base >> 32)
    }

    private func writeCode() {
        let code: [UInt8] = [
            0xf3, 0xa4,  // rep movsb        (rsi -> rdi, rcx bytes)
            0xe6, UInt8(Self.donePort),  // out 0x10, al  (done: exit to the VMM)
            0xeb, 0xfe,  // jmp $            (never reached: the VMM resets RIP)
        ]
        for (i, b) in code.enumerated() { memory.storeBytes(of: b, toByteOffset: Int(Self.codeBase) + i, as: UInt8.self) }
        // VMMCALL on AMD, VMCALL on Intel (KVM patches the other one in anyway).
        let hypercall: [UInt8] = (Self.isAMD ? [0x0f, 0x01, 0xd9] : [0x0f, 0x01, 0xc1]) + [0xe6, UInt8(Self.hypercallPort), 0xeb, 0xfe]
        for (i, b) in hypercall.enumerated() {
            memory.storeBytes(of: b, toByteOffset: Int(Self.hypercallCode) + i, as: UInt8.self)
        }
    }

    /// CPUID vendor "AuthenticAMD" (from /proc/cpuinfo, which needs no inline asm).
    static let isAMD: Bool = {
        guard let f = fopen("/proc/cpuinfo", "r") else { return false }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, 256, f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("vendor_id") { return text.contains("AuthenticAMD") || text.contains("HygonGenuine") }
        }
        return false
    }()

    /// Makes the identity map cover the 1 GiB regions `gib` (region n is
    /// [n GiB, n+1 GiB)). Returns false when the table pool is exhausted.
    /// Only adds entries, never changes one, so no guest TLB can hold a stale one.
    func ensureMapped(_ gib: Range<UInt64>) -> Bool {
        for g in gib where !mappedGiB.contains(g) {
            let pml4Index = g >> 9
            let pdptIndex = g & 511
            var pdpt = load64(Self.pml4 + pml4Index * 8) & ~0xfff
            if pdpt == 0 {
                guard let page = allocateTablePage() else { return false }
                pdpt = page
                store64(Self.pml4 + pml4Index * 8, pdpt | 0x7)
            }
            guard let pd = allocateTablePage() else { return false }
            for i in UInt64(0)..<512 {
                let address = g << 30 | i << 21
                store64(pd + i * 8, address | 0x87)  // P | RW | US | PS (2 MiB)
            }
            store64(pdpt + pdptIndex * 8, pd | 0x7)
            mappedGiB.insert(g)
        }
        return true
    }

    private func allocateTablePage() -> UInt64? {
        guard nextTablePage < Self.pageTablePool.upperBound else { return nil }
        defer { nextTablePage += 0x1000 }
        memset(memory + Int(nextTablePage), 0, 0x1000)
        return nextTablePage
    }

    /// A compiled program: the verify ops' ranges, by the index the code passes in RBX.
    struct Compiled {
        var verifies: [(gpa: UInt64, length: UInt64)] = []
    }

    /// Emits `program` as x86-64 at programBase, its fill and verify data into the
    /// bounce buffer, and maps every range it touches.
    func compile(_ program: GuestProgram) throws(BackendError) -> Compiled {
        guard program.dataSize <= Self.bounceCapacity else {
            throw .unsupported("the program's fills and verifies need more than \(Self.bounceCapacity) bytes of data")
        }
        var code: [UInt8] = []
        var compiled = Compiled()
        var data = Self.bounce.lowerBound
        func movImm64(_ reg: UInt8, _ value: UInt64) {
            code += [0x48, 0xb8 + reg]
            withUnsafeBytes(of: value.littleEndian) { code += $0 }
        }
        func out(_ port: UInt16) { code += [0xe6, UInt8(port)] }
        let (rax, rcx, rdx, rbx, rsi, rdi): (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) = (0, 1, 2, 3, 6, 7)
        func place(_ pattern: [UInt8], _ length: UInt64) -> UInt64 {
            let bytes = GuestProgram.expand(pattern, to: length)
            bytes.withUnsafeBytes { (memory + Int(data)).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
            defer { data += length }
            return data
        }
        func checkRange(_ gpa: UInt64, _ length: UInt64) throws(BackendError) {
            let (end, overflow) = gpa.addingReportingOverflow(length)
            guard !overflow, end <= Self.mappableLimit else { throw .unsupported("the guest harness identity-maps GPAs below 2^47 only") }
            if length > 0 && gpa < Self.size { throw .unsupported("GPA [0, 32 MiB) is the kernel backend's guest harness") }
            guard ensureMapped((gpa >> 30)..<((end + (1 << 30) - 1) >> 30)) else {
                throw .unsupported("the guest harness ran out of page-table pages")
            }
        }
        for op in program.ops {
            switch op {
            case .fill(let gpa, let length, let pattern):
                try checkRange(gpa, length)
                movImm64(rsi, place(pattern, length))
                movImm64(rdi, gpa)
                movImm64(rcx, length)
                code += [0xf3, 0xa4]  // rep movsb
            case .verify(let gpa, let length, let pattern):
                try checkRange(gpa, length)
                movImm64(rsi, gpa)
                movImm64(rdi, place(pattern, length))
                movImm64(rcx, length)
                movImm64(rbx, UInt64(compiled.verifies.count))
                code += [0xf3, 0xa6]  // repe cmpsb: ZF set if all equal
                out(Self.verifyPort)
                compiled.verifies.append((gpa, length))
            case .report(let value):
                code += [0xb8]  // mov eax, imm32
                withUnsafeBytes(of: value.littleEndian) { code += $0 }
                code += [0xe7, UInt8(Self.reportPort)]  // out 0x14, eax: the value travels in the exit
            case .convert(let request):
                switch request.channel {
                case .doorbell:
                    // Arguments in the mailbox (mov rax, imm64; mov [moffs64], rax), then
                    // `in eax, 0x12`: the VMM answers in the exit's data, which KVM loads
                    // into EAX (zero-extended into RAX) when the vCPU runs again.
                    for (i, v) in [request.gpa, request.npages, request.toPrivate ? 1 : 0].enumerated() {
                        movImm64(rax, v)
                        code += [0x48, 0xa3]
                        withUnsafeBytes(of: (Self.mailbox + UInt64(i) * 8).littleEndian) { code += $0 }
                    }
                    code += [0xe5, UInt8(Self.doorbellPort)]
                case .memoryFault:
                    throw .unsupported("a memory-fault request is an exit, not a guest instruction")
                case .hypercall:
                    movImm64(rax, UAPI.KVM_HC_MAP_GPA_RANGE)
                    movImm64(rbx, request.gpa)
                    movImm64(rcx, request.npages)
                    movImm64(rdx, request.toPrivate ? 0x10 : 0)
                    code += Self.isAMD ? [0x0f, 0x01, 0xd9] : [0x0f, 0x01, 0xc1]
                    out(Self.hypercallReturnPort)
                }
            }
        }
        out(Self.donePort)
        code += [0xeb, 0xfe]
        guard UInt64(code.count) <= Self.programLimit - Self.programBase else {
            throw .unsupported("the program's code is larger than the harness's program area")
        }
        code.withUnsafeBytes { (memory + Int(Self.programBase)).copyMemory(from: $0.baseAddress!, byteCount: code.count) }
        return compiled
    }

    /// The bounce buffer, as host memory.
    var bounceBuffer: UnsafeMutableRawPointer { memory + Int(Self.bounce.lowerBound) }
    static var bounceCapacity: UInt64 { UInt64(bounce.count) }

    /// Sets up a vCPU for the harness: CPUID, long mode at CPL3, page tables.
    static func configure(vcpuFD: Int32, kvmFD: Int32) throws(BackendError) {
        try setCPUID(vcpuFD: vcpuFD, kvmFD: kvmFD)
        var sregs = kvm_sregs()
        try check(ckvm_ioctl_ptr(vcpuFD, CKVM_GET_SREGS, &sregs))
        sregs.cr0 = 0x8005_0033  // PE MP ET NE WP PG
        sregs.cr3 = pml4
        sregs.cr4 = 0x620  // PAE OSFXSR OSXMMEXCPT
        sregs.efer = 0x500  // LME LMA
        sregs.cs = segment(selector: 0x23, type: 11, dpl: 3, long: true)
        let data = segment(selector: 0x1b, type: 3, dpl: 3, long: false)
        sregs.ds = data
        sregs.es = data
        sregs.fs = data
        sregs.gs = data
        sregs.ss = data
        sregs.gdt.base = gdtBase
        sregs.gdt.limit = 7 * 8 - 1
        sregs.idt.base = 0
        sregs.idt.limit = 0
        var tr = kvm_segment()
        tr.base = tssBase
        tr.limit = 0x67
        tr.selector = 0x28
        tr.type = 11  // busy 64-bit TSS
        tr.present = 1
        sregs.tr = tr
        var ldt = kvm_segment()
        ldt.unusable = 1
        ldt.type = 2
        sregs.ldt = ldt
        try check(ckvm_ioctl_ptr(vcpuFD, CKVM_SET_SREGS, &sregs))
    }

    private static func segment(selector: UInt16, type: UInt8, dpl: UInt8, long: Bool) -> kvm_segment {
        var s = kvm_segment()
        s.base = 0
        s.limit = 0xffff_ffff
        s.selector = selector
        s.type = type
        s.present = 1
        s.dpl = dpl
        s.db = long ? 0 : 1
        s.s = 1
        s.l = long ? 1 : 0
        s.g = 1
        return s
    }

    private static func setCPUID(vcpuFD: Int32, kvmFD: Int32) throws(BackendError) {
        let maxEntries = 256
        let bytes = 8 + maxEntries * MemoryLayout<kvm_cpuid_entry2>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        memset(buffer, 0, bytes)
        buffer.storeBytes(of: UInt32(maxEntries), as: UInt32.self)
        try check(ckvm_ioctl_ptr(kvmFD, CKVM_GET_SUPPORTED_CPUID, buffer))
        try check(ckvm_ioctl_ptr(vcpuFD, CKVM_SET_CPUID2, buffer))
    }

    /// Points the vCPU at the copy loop: `count` bytes from guest VA `source` to `destination`.
    static func setRegisters(vcpuFD: Int32, source: UInt64, destination: UInt64, count: UInt64) throws(BackendError) {
        var regs = kvm_regs()
        regs.rip = codeBase
        regs.rsp = stackTop
        regs.rflags = 0x3002  // IOPL 3, so OUT is allowed at CPL3
        regs.rsi = source
        regs.rdi = destination
        regs.rcx = count
        try check(ckvm_ioctl_ptr(vcpuFD, CKVM_SET_REGS, &regs))
    }
}

/// Turns a -errno result into a thrown Errno.
@discardableResult
func check<T: BinaryInteger>(_ r: T) throws(BackendError) -> T {
    if r < 0 { throw .errno(Errno(rawValue: Int32(truncatingIfNeeded: 0 - Int64(r)))) }
    return r
}
#endif
