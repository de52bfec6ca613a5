#if os(Linux)
import CKVM
import GMemBackend
import Glibc

/// The Backend protocol on the host's real /dev/kvm and guest_memfd.
///
/// Every call is the syscall or ioctl of the same name; errnos are the kernel's.
/// Guest accesses run real guest code on a real vCPU (see `GuestHarness`).
/// Raw fd numbers from a scenario that this backend did not hand out are replaced by
/// -1 (always EBADF), so a scenario can never reach the backend's own descriptors.
public final class KernelBackend: Backend {
    public let name = "kernel"
    let kvm: Int32
    let runSize: Int
    /// Descriptors this backend handed out (VMs, vCPUs, guest_memfds, memfds).
    private var handedOut: Set<Int32> = []
    var vcpus: [Int32: VCPU] = [:]
    /// What the backend knows of each VM, by the scenario's VM fd. Its vCPUs hold the
    /// same record, so a VM that lives on after its fd is closed (through its vCPUs)
    /// keeps its harness, and a reused fd number never reaches a dead VM's.
    var vms: [Int32: VMRecord] = [:]
    /// Per-access time limit for a guest that never exits.
    public var guestTimeoutMS: UInt32 = 2000
    /// What this backend lets the kernel allocate (see `MemoryBudget`).
    public var budget = MemoryBudget(limit: MemoryBudget.defaultLimit)
    /// The most bytes one step may return (`Limits.defaultTransfer`; `--max-transfer`).
    public var transferLimit = Limits.defaultTransfer
    /// Mappings made for the scenario, unmapped when the backend goes.
    private var ledger = MappingLedger()
    /// guest_memfds and memfds this backend made, for charging fallocate precisely.
    private var fileKinds: [Int32: Bool] = [:]  // true: guest_memfd

    /// One VM as this backend drives it: the guest harness, once guest code has run,
    /// and the scenario's memslots (id to size), for picking the harness a free slot,
    /// keeping scenarios off it and bounding what pre-faults map.
    final class VMRecord {
        var harness: GuestHarness?
        var slots: [UInt32: UInt64] = [:]
    }

    final class VCPU {
        let fd: Int32
        /// A dup of the VM fd, so the harness can add its memslot after the
        /// scenario closed its own VM fd.
        let vmFD: Int32
        let vm: VMRecord
        let run: UnsafeMutableRawPointer
        let runSize: Int
        var configured = false
        init(fd: Int32, vmFD: Int32, vm: VMRecord, run: UnsafeMutableRawPointer, runSize: Int) {
            self.fd = fd
            self.vmFD = vmFD
            self.vm = vm
            self.run = run
            self.runSize = runSize
        }
        deinit {
            _ = ckvm_munmap(UInt64(UInt(bitPattern: run)), UInt64(runSize))
            _ = ckvm_close(vmFD)
        }
        var exitReason: UInt32 { run.load(fromByteOffset: 8, as: UInt32.self) }
        var exitUnion: UnsafeMutableRawPointer { run + ckvm_run_exit_union_offset() }
        var immediateExit: UInt8 {
            get { run.load(fromByteOffset: 1, as: UInt8.self) }
            set { run.storeBytes(of: newValue, toByteOffset: 1, as: UInt8.self) }
        }
    }

    /// Why /dev/kvm cannot be used here, or nil if it can.
    public static func unavailableReason() -> String? {
        let fd = ckvm_open_rdwr("/dev/kvm")
        if fd < 0 { return "cannot open /dev/kvm: \(String(cString: strerror(-fd)))" }
        defer { _ = ckvm_close(fd) }
        let version = ckvm_ioctl_val(fd, CKVM_GET_API_VERSION, 0)
        if version < 0 { return "/dev/kvm is not KVM: KVM_GET_API_VERSION failed with \(Errno(rawValue: Int32(-version)).name)" }
        if version != 12 { return "KVM_GET_API_VERSION is \(version), expected 12" }
        if ckvm_ioctl_val(fd, CKVM_CHECK_EXTENSION, UInt(Capability.guestMemfd.number)) <= 0 {
            return "this kernel has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)"
        }
        return nil
    }

    public init() throws(BackendError) {
        if let why = Self.unavailableReason() { throw .unsupported(why) }
        kvm = ckvm_open_rdwr("/dev/kvm")
        runSize = Int(try check(ckvm_ioctl_val(kvm, CKVM_GET_VCPU_MMAP_SIZE, 0)))
    }

    /// Releases everything the run made: the scenario's mappings, vCPUs and their
    /// harnesses, and every descriptor, so a long run holds one scenario's memory at most.
    deinit {
        ledger.releaseAll()
        vcpus.removeAll()
        vms.removeAll()
        for fd in handedOut { _ = ckvm_close(fd) }
        _ = ckvm_close(kvm)
    }

    /// The VM types this kernel accepts, whether it has memory attributes and TDP:
    /// what a model needs to stand for this host.
    public var hostProfile: HostProfile {
        let ids = capability(.maxVCPUID)
        var p = HostProfile(
            vmTypes: max(capability(.vmTypes), 1), memoryAttributes: capability(.memoryAttributes) != 0,
            tdp: capability(.preFaultMemory) != 0, inPlace: capability(.guestMemfdMemoryAttributes) != 0,
            maxVCPUIDs: ids > 0 && ids <= UInt64(UInt32.max) ? UInt32(ids) : 1024, commitLimit: MemoryBudget.commitLimit(),
            bindOffsetWraps: Self.bindOffsetWraps, shadowPrefetchFromHVA: capability(.preFaultMemory) == 0)
        p.gmemFlags = capability(.guestMemfdFlags) != 0
        return p
    }

    /// Whether this kernel's kvm_gmem_bind() lets offset + size wrap as a signed
    /// loff_t (6.18): measured once per process by binding one page of a 4 KiB
    /// guest_memfd at offset 2^63 - 4 KiB with a two-page memslot, in a VM of its own.
    static let bindOffsetWraps: Bool = {
        let kvm = ckvm_open_rdwr("/dev/kvm")
        guard kvm >= 0 else { return false }
        defer { _ = ckvm_close(kvm) }
        let vm = Int32(truncatingIfNeeded: ckvm_ioctl_val(kvm, CKVM_CREATE_VM, 0))
        guard vm >= 0 else { return false }
        defer { _ = ckvm_close(vm) }
        var args = ckvm_create_guest_memfd()
        args.size = 4096
        let gmem = Int32(truncatingIfNeeded: ckvm_ioctl_ptr(vm, CKVM_CREATE_GUEST_MEMFD, &args))
        guard gmem >= 0 else { return false }
        defer { _ = ckvm_close(gmem) }
        var r = ckvm_userspace_memory_region2()
        r.slot = 0
        r.flags = UAPI.KVM_MEM_GUEST_MEMFD
        r.guest_phys_addr = 1 << 30
        r.memory_size = 8192
        r.guest_memfd = UInt32(gmem)
        r.guest_memfd_offset = 0x7fff_ffff_ffff_f000
        return ckvm_ioctl_ptr(vm, CKVM_SET_USER_MEMORY_REGION2, &r) == 0
    }()

    /// A capability of /dev/kvm, or 0 where the kernel does not know it.
    public func capability(_ cap: Capability) -> UInt64 {
        let r = ckvm_ioctl_val(kvm, CKVM_CHECK_EXTENSION, UInt(cap.number))
        return r < 0 ? 0 : UInt64(r)
    }

    public func missing(_ feature: Feature) -> String? {
        switch feature {
        case .swProtected:
            return capability(.vmTypes) & 2 == 0 ? "this kernel's KVM_CAP_VM_TYPES lacks KVM_X86_SW_PROTECTED_VM" : nil
        case .memoryAttributes:
            return capability(.memoryAttributes) & UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE == 0
                ? "this kernel has no KVM_SET_MEMORY_ATTRIBUTES with PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES is 0)" : nil
        case .preFaultMemory:
            return capability(.preFaultMemory) == 0 ? "KVM_CAP_PRE_FAULT_MEMORY is 0 (shadow paging)" : nil
        case .memoryFailure:
            return "memory_failure would poison a real page of this host (MADV_HWPOISON); it runs on the model only"
        case .inPlaceConversion:
            return capability(.guestMemfdMemoryAttributes) == 0
                ? "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES is 0: no in-place conversion in this kernel" : nil
        case .pins:
            return "pinning from a scenario needs CONFIG_GUP_TEST or io_uring buffers; not yet in the kernel backend"
        case .processes:
            return "the kernel backend drives one process; forked host processes run on the model"
        case .iommu:
            return "IOMMU domains and device DMA run on the model (no VFIO device here)"
        case .pkvm:
            return "no pKVM on this host (an x86 kvm-pvm guest); the ownership state machine runs on the model"
        case .noDirectMap:
            return capability(.guestMemfdFlags) & UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP == 0
                ? "KVM_CAP_GUEST_MEMFD_FLAGS lacks NO_DIRECT_MAP on this kernel" : nil
        case .cocoPlatforms:
            return capability(.vmTypes) & 0b11_0000 == 0b11_0000 ? nil : "KVM_CAP_VM_TYPES lacks SNP and TDX VMs on this host"
        }
    }

    /// The real descriptor for a scenario fd: itself if this backend handed it out,
    /// else -1.
    func real(_ fd: FD) -> Int32 { handedOut.contains(fd.raw) ? fd.raw : -1 }

    private func adopt(_ r: some BinaryInteger) throws(BackendError) -> FD {
        let fd = Int32(try check(r))
        handedOut.insert(fd)
        return FD(fd)
    }

    // MARK: KVM

    public func checkExtension(on fd: FD?, _ cap: Capability) throws(BackendError) -> UInt64 {
        let target = fd.map(real) ?? kvm
        return UInt64(try check(ckvm_ioctl_val(target, CKVM_CHECK_EXTENSION, UInt(cap.number))))
    }

    public func createVM(type: UInt64, conversion: ConversionPolicy) throws(BackendError) -> FD {
        if conversion == .inPlace, let why = missing(.inPlaceConversion) { throw .unsupported(why) }
        let fd = try adopt(ckvm_ioctl_val(kvm, CKVM_CREATE_VM, UInt(truncatingIfNeeded: type)))
        vms[fd.raw] = VMRecord()
        return fd
    }

    public func createVCPU(vm: FD, id: UInt32) throws(BackendError) -> FD {
        let vmFD = real(vm)
        let fd = try adopt(ckvm_ioctl_val(vmFD, CKVM_CREATE_VCPU, UInt(id)))
        let addr = try check(ckvm_mmap(OwnMappings.hint(UInt64(runSize)), UInt64(runSize), PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, 0))
        let p = UnsafeMutableRawPointer(bitPattern: addr)!
        let dup = Glibc.dup(vmFD)
        vcpus[fd.raw] = VCPU(fd: fd.raw, vmFD: dup, vm: vms[vmFD] ?? VMRecord(), run: p, runSize: runSize)
        return fd
    }

    public func createGuestMemfd(on fd: FD?, size: UInt64, flags: UInt64) throws(BackendError) -> FD {
        var args = ckvm_create_guest_memfd()
        args.size = size
        args.flags = flags
        let gmem = try adopt(ckvm_ioctl_ptr(fd.map(real) ?? kvm, CKVM_CREATE_GUEST_MEMFD, &args))
        fileKinds[gmem.raw] = true
        return gmem
    }

    /// The running kernel has upstream's ownership; the alternative is model-only.
    public func setBindingOwnership(_ policy: BindingOwnership) throws(BackendError) {
        if policy != .fileHoldsVM {
            throw .unsupported("this kernel has upstream binding ownership (the file holds the VM); \(policy.rawValue) runs on the model")
        }
    }

    public func memfdCreate(size: UInt64, secret: Bool) throws(BackendError) -> FD {
        guard secret else {
            let fd = try adopt(ckvm_memfd_create("gmem-scenario", size))
            fileKinds[fd.raw] = false
            return fd
        }
        let fd = ckvm_memfd_secret(size)
        if fd == -Errno.ENOSYS.rawValue { throw .unsupported("memfd_secret(2) is not enabled on this kernel") }
        return try adopt(fd)
    }

    public func close(_ fd: FD) throws(BackendError) {
        let r = real(fd)
        try check(ckvm_close(r))
        handedOut.remove(r)
        fileKinds[r] = nil
        vcpus[r] = nil
        // The fd number may be reused by another VM; the record lives on in the vCPUs.
        vms[r] = nil
    }

    // MARK: Files

    public func fstat(_ fd: FD) throws(BackendError) -> FileStat {
        var st = ckvm_stat()
        try check(ckvm_fstat(real(fd), &st))
        return FileStat(size: st.size, blksize: st.blksize, blocks: st.blocks, inode: st.ino)
    }

    public func read(_ fd: FD, count: UInt64) throws(BackendError) -> [UInt8] {
        try readInto(count, fd: fd, pos: nil) { buf throws(BackendError) in try check(ckvm_read(real(fd), buf, count)) }
    }

    public func pread(_ fd: FD, count: UInt64, offset: UInt64) throws(BackendError) -> [UInt8] {
        try readInto(count, fd: fd, pos: offset) { buf throws(BackendError) in try check(ckvm_pread(real(fd), buf, count, offset)) }
    }

    /// Runs a read into a buffer of `count` bytes, as a VMM's would be. A count over
    /// the transfer limit gets a reserved (MAP_NORESERVE) buffer of that size, so the
    /// kernel's access_ok() sees what it would see, after checking that the bytes the
    /// read can return (to EOF of a memfd, MAX_RW_COUNT at most) are within the limit;
    /// a count no buffer can have (over TASK_SIZE) gets one page, and the kernel's
    /// EFAULT, or whatever it checks first.
    private func readInto(_ count: UInt64, fd: FD, pos: UInt64?, _ body: (UnsafeMutableRawPointer) throws(BackendError) -> Int64)
        throws(BackendError) -> [UInt8]
    {
        guard count > transferLimit else { return try readSmall(count, body) }
        var most: UInt64 = 0
        if fileKinds[real(fd)] == false {
            var st = ckvm_stat()
            let at = pos ?? UInt64(max(ckvm_lseek(real(fd), 0, SEEK_CUR), 0))
            if ckvm_fstat(real(fd), &st) == 0, st.size > at { most = min(st.size - at, Limits.maxRWCount, count) }
        }
        if let why = Limits.transferRefusal(most, limit: transferLimit, what: "a read") { throw .unsupported(why) }
        let length = count > UAPI.TASK_SIZE_MAX ? 4096 : count
        let addr = ckvm_mmap(OwnMappings.hint(length), length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard addr > 0, let buf = UnsafeMutableRawPointer(bitPattern: addr) else {
            throw .unsupported("could not reserve a \(count)-byte read buffer")
        }
        defer { _ = ckvm_munmap(UInt64(UInt(bitPattern: addr)), length) }
        let n = try body(buf)
        return Array(UnsafeRawBufferPointer(start: buf, count: Int(min(UInt64(n), most))))
    }

    private func readSmall(_ count: UInt64, _ body: (UnsafeMutableRawPointer) throws(BackendError) -> Int64)
        throws(BackendError) -> [UInt8]
    {
        var out = [UInt8](repeating: 0, count: Int(count))
        var n: Int64 = 0
        var failure: BackendError?
        out.withUnsafeMutableBytes { raw in
            do throws(BackendError) {
                n = try body(raw.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)!)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return Array(out.prefix(Int(n)))
    }

    public func write(_ fd: FD, _ bytes: [UInt8]) throws(BackendError) -> UInt64 {
        try budget.charge(UInt64(bytes.count), "write(2)")
        return UInt64(try check(bytes.withUnsafeBytes { ckvm_write(real(fd), $0.baseAddress, UInt64($0.count)) }))
    }

    public func pwrite(_ fd: FD, _ bytes: [UInt8], offset: UInt64) throws(BackendError) -> UInt64 {
        try budget.charge(UInt64(bytes.count), "pwrite(2)")
        return UInt64(try check(bytes.withUnsafeBytes { ckvm_pwrite(real(fd), $0.baseAddress, UInt64($0.count), offset) }))
    }

    public func lseek(_ fd: FD, offset: Int64, whence: Int32) throws(BackendError) -> UInt64 {
        UInt64(try check(ckvm_lseek(real(fd), offset, whence)))
    }

    public func ftruncate(_ fd: FD, size: UInt64) throws(BackendError) {
        try check(ckvm_ftruncate(real(fd), size))
    }

    public func fallocate(_ fd: FD, mode: UInt32, offset: UInt64, length: UInt64) throws(BackendError) {
        try budget.charge(fallocateCharge(real(fd), mode: mode, offset: offset, length: length), "fallocate(2)")
        try check(ckvm_fallocate(real(fd), Int32(bitPattern: mode), offset, length))
    }

    /// What a fallocate(2) could allocate: nothing for a punch, an invalid mode or a
    /// descriptor that is not one of this backend's files; for a guest_memfd, nothing
    /// when guest_memfd refuses the range (unaligned, past EOF) before allocating.
    private func fallocateCharge(_ fd: Int32, mode: UInt32, offset: UInt64, length: UInt64) -> UInt64 {
        guard let isGmem = fileKinds[fd], mode & ~UAPI.FALLOC_FL_KEEP_SIZE == 0 else { return 0 }
        guard isGmem else { return length }
        var st = ckvm_stat()
        guard ckvm_fstat(fd, &st) == 0 else { return length }
        let (end, overflow) = offset.addingReportingOverflow(length)
        let aligned = (offset | length) & (UAPI.pageSize - 1) == 0
        return !overflow && aligned && end <= st.size ? length : 0
    }

    // MARK: Host memory

    public func mmap(fd: FD?, offset: UInt64, length: UInt64, prot: Protection, shared: Bool) throws(BackendError)
        -> Mapping
    {
        var flags = shared ? MAP_SHARED : MAP_PRIVATE
        if fd == nil { flags |= MAP_ANONYMOUS | MAP_NORESERVE }
        let addr = ckvm_mmap(nil, length, Int32(prot.rawValue), flags, fd.map(real) ?? -1, offset)
        try check(addr)
        ledger.add(UInt64(UInt(bitPattern: addr)), length)
        return Mapping(address: UInt64(UInt(bitPattern: addr)), length: length)
    }

    public func mprotect(address: UInt64, length: UInt64, prot: Protection) throws(BackendError) {
        try check(ckvm_mprotect(address, length, Int32(prot.rawValue)))
    }

    public func munmap(_ mapping: Mapping) throws(BackendError) {
        try check(ckvm_munmap(mapping.address, mapping.length))
        ledger.remove(mapping.address, mapping.length)
    }

    public func hostWrite(address: UInt64, bytes: [UInt8]) throws(BackendError) -> HostAccess {
        try budget.charge(Self.pagesTouched(address, UInt64(bytes.count)), "a host write")
        guard let dst = UnsafeMutableRawPointer(bitPattern: UInt(address)) else { return .sigsegv(address: address) }
        var fault: UInt64 = 0
        let signo = bytes.withUnsafeBytes { ckvm_probe_copy(dst, $0.baseAddress, UInt64($0.count), &fault) }
        return Self.hostOutcome(signo, fault, [])
    }

    public func hostRead(address: UInt64, count: UInt64) throws(BackendError) -> HostAccess {
        if let why = Limits.transferRefusal(count, limit: transferLimit, what: "a host read") { throw .unsupported(why) }
        try budget.charge(Self.pagesTouched(address, count), "a host read")
        guard let src = UnsafeRawPointer(bitPattern: UInt(address)) else { return .sigsegv(address: address) }
        var out = [UInt8](repeating: 0, count: Int(count))
        var fault: UInt64 = 0
        let signo = out.withUnsafeMutableBytes { ckvm_probe_copy($0.baseAddress, src, count, &fault) }
        return Self.hostOutcome(signo, fault, out)
    }

    /// The bytes of the pages [address, address + count) touches: what faulting them
    /// in could allocate.
    static func pagesTouched(_ address: UInt64, _ count: UInt64) -> UInt64 {
        guard count > 0 else { return 0 }
        let (end, overflow) = address.addingReportingOverflow(count)
        let last = overflow ? UInt64.max >> UAPI.pageShift : (end - 1) >> UAPI.pageShift
        return (last - (address >> UAPI.pageShift) + 1) &* UAPI.pageSize
    }

    static func hostOutcome(_ signo: Int32, _ fault: UInt64, _ bytes: [UInt8]) -> HostAccess {
        switch signo {
        case 0: .completed(bytes)
        case SIGBUS: .sigbus(address: fault)
        default: .sigsegv(address: fault)
        }
    }

    // MARK: Memslots and attributes

    public func setUserMemoryRegion2(vm: FD, _ region: UserMemoryRegion2) throws(BackendError) {
        try setRegion(vm: vm, region, request: CKVM_SET_USER_MEMORY_REGION2)
    }

    public func setUserMemoryRegion(vm: FD, _ region: UserMemoryRegion2) throws(BackendError) {
        try setRegion(vm: vm, region, request: CKVM_SET_USER_MEMORY_REGION)
    }

    private func setRegion(vm: FD, _ region: UserMemoryRegion2, request: UInt) throws(BackendError) {
        let vmFD = real(vm)
        if let h = vms[vmFD]?.harness {
            if region.slot == h.slot {
                throw .unsupported("memslot \(h.slot) holds the kernel backend's guest harness in this VM")
            }
            if region.memorySize != 0 && region.guestPhysAddr < GuestHarness.size {
                throw .unsupported("GPA [0, 32 MiB) is the kernel backend's guest harness in this VM")
            }
        }
        var r = ckvm_userspace_memory_region2()
        r.slot = region.slot
        r.flags = region.flags
        r.guest_phys_addr = region.guestPhysAddr
        r.memory_size = region.memorySize
        r.userspace_addr = region.userspaceAddr
        r.guest_memfd_offset = region.guestMemfdOffset
        r.guest_memfd = region.guestMemfd <= UInt32(Int32.max) && !handedOut.contains(Int32(region.guestMemfd))
            ? UInt32.max : region.guestMemfd
        try check(ckvm_ioctl_ptr(vmFD, request, &r))
        vms[vmFD]?.slots[region.slot] = region.memorySize == 0 ? nil : region.memorySize
    }

    public func setMemoryAttributes(vm: FD, address: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError)
    {
        var a = ckvm_memory_attributes()
        a.address = address
        a.size = size
        a.attributes = attributes
        a.flags = flags
        try check(ckvm_ioctl_ptr(real(vm), CKVM_SET_MEMORY_ATTRIBUTES, &a))
    }

    /// KVM_SET_MEMORY_ATTRIBUTES2, issued on the guest_memfd as the in-place series
    /// defines it; kernels without the series answer ENOTTY.
    public func setGuestMemfdAttributes(fd: FD, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        throws(BackendError) -> ConversionOutcome
    {
        var a = ckvm_memory_attributes2()
        a.offset = offset
        a.size = size
        a.attributes = attributes
        a.flags = flags
        let r = ckvm_ioctl_ptr(real(fd), CKVM_SET_MEMORY_ATTRIBUTES2, &a)
        return ConversionOutcome(errno: r < 0 ? Errno(rawValue: Int32(-r)) : nil, errorOffset: a.error_offset)
    }
}
#endif
