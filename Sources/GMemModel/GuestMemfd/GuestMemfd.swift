import GMemBackend

/// Per-page state of a guest_memfd's page cache.
enum GmemPageState: UInt8, Hashable {
    /// No folio: never allocated, or punched.
    case hole
    /// Allocated by fallocate but never faulted: contents not yet zeroed.
    case allocated
    /// Faulted by the host or the guest: zeroed once and marked uptodate.
    case uptodate
}

/// The guest_memfd inode: the memory itself. It outlives the VM and every file.
struct GmemInode: Hashable {
    let ino: UInt64
    /// i_size; immutable after create.
    let size: UInt64
    /// GUEST_MEMFD_FLAG_* given at create.
    let flags: UInt64
    /// Allocation state per page offset, coalesced.
    var state = RangeMap(GmemPageState.hole)
    /// The frames of pages that were faulted (page cache entries with identity).
    var folios = PageMap<UInt64>()
    /// Files (one per VM view) that refer to this inode.
    var files: Set<UInt64> = []
    /// Shareability is tracked here (in-place conversion) rather than in the VM.
    let inPlace: Bool
    /// Per page offset: private (true) or shared. Every index has a value; the
    /// default is private unless INIT_SHARED. Meaningful when `inPlace`.
    var privatePages = RangeMap(true)
    /// filemap_invalidate_lock held exclusively (a conversion between its refcount
    /// check and its flip): host faults on the file wait. Only the explorer's split
    /// conversion holds it across a step.
    var invalidateLocked = false
    /// Holders of filemap_invalidate_lock in shared mode that the explorer can pause
    /// (an IOMMU map between its check and its install); a conversion waits for them.
    var invalidateReaders = 0

    var pages: UInt64 { size >> UAPI.pageShift }
    var supportsMmap: Bool { flags & UAPI.GUEST_MEMFD_FLAG_MMAP != 0 }
    /// AS_NO_DIRECT_MAP: GUP refuses the file's pages, shared or not.
    var noDirectMap: Bool { flags & UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 }
    var initShared: Bool { flags & UAPI.GUEST_MEMFD_FLAG_INIT_SHARED != 0 }

    /// Whether the host may map page `pgoff`: per page with in-place conversion,
    /// for the whole file (INIT_SHARED) in mainline.
    func isShared(_ pgoff: UInt64) -> Bool {
        inPlace ? !privatePages.value(at: pgoff) : initShared
    }

    init(ino: UInt64, size: UInt64, flags: UInt64, inPlace: Bool) {
        self.ino = ino
        self.size = size
        self.flags = flags
        self.inPlace = inPlace
        privatePages = RangeMap(flags & UAPI.GUEST_MEMFD_FLAG_INIT_SHARED == 0)
    }
}

/// struct gmem_file: one VM's view of an inode, with its memslot bindings.
struct GmemFile: Hashable {
    let inode: UInt64
    /// The VM this file is a view for: from creation upstream; from the first bind
    /// when the file was created on /dev/kvm (memslots-hold-file policy).
    var vm: UInt64?
    /// The memslot bound at each page offset (as_id << 16 | slot id), or nil.
    var bindings = RangeMap<UInt32?>(nil)
    /// The file's refcount reached zero but kvm_gmem_release() has not run yet:
    /// get_file_active() fails, so kvm_gmem_get_file() returns NULL.
    var dying = false
}

extension Kernel {
    /// kvm_gmem_get_supported_flags(): MMAP always; INIT_SHARED unless the VM
    /// has private memory (x86 mainline), and always when asked of /dev/kvm.
    func gmemSupportedFlags(vm: UInt64?) -> UInt64 {
        guard config.gmemFlags else { return config.noDirectMap ? UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP : 0 }
        var flags = UAPI.GUEST_MEMFD_FLAG_MMAP | (config.noDirectMap ? UAPI.GUEST_MEMFD_FLAG_NO_DIRECT_MAP : 0)
        // x86: INIT_SHARED when in-place conversion is on or the VM has no private memory.
        if let vm, vms[vm]!.type.hasPrivateMemory, vms[vm]!.conversion == .attributes {
            return flags
        }
        flags |= UAPI.GUEST_MEMFD_FLAG_INIT_SHARED
        return flags
    }

    /// KVM_CREATE_GUEST_MEMFD, issued on `fd` (nil: /dev/kvm, where only the
    /// memslots-hold-file policy creates a file with no VM).
    public mutating func createGuestMemfd(on fd: Int32?, size: UInt64, flags: UInt64) throws(Errno) -> Int32 {
        let vm: UInt64?
        if let fd {
            vm = try vmFD(fd)
        } else {
            guard config.bindingOwnership == .memslotHoldsFile else { throw .EINVAL }  // kvm_dev_ioctl default
            vm = nil
        }
        if flags & ~gmemSupportedFlags(vm: vm) != 0 { throw .EINVAL }
        // size is a loff_t: zero, negative or unaligned is EINVAL.
        if size == 0 || Int64(bitPattern: size) < 0 || size & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let ino = newID()
        gmemInodes[ino] = GmemInode(ino: ino, size: size, flags: flags, inPlace: vm.map { vms[$0]!.conversion == .inPlace } ?? false)
        let fd = installFD(.guestMemfd(inode: ino))
        let fileID = fds[fd]!
        gmemFiles[fileID] = GmemFile(inode: ino, vm: vm)
        gmemInodes[ino]!.files.insert(fileID)
        // Upstream the file holds the VM (kvm_get_kvm); the VM does not hold the file.
        if let vm, config.bindingOwnership == .fileHoldsVM { vms[vm]!.refs += 1 }
        return fd
    }

    // MARK: fallocate

    /// fallocate(2) on any file: the VFS checks, then the file's own.
    public mutating func fallocate(_ fd: Int32, mode: UInt32, offset: UInt64, length: UInt64) throws(Errno) {
        let (_, f) = try file(fd)
        let regular: Bool
        switch f.kind {
        case .guestMemfd, .memfd: regular = true
        case .kvmDevice, .vm, .vcpu: regular = false  // anonymous-inode files
        }
        try vfsFallocateChecks(mode: mode, offset: offset, length: length, regular: regular)
        switch f.kind {
        case .guestMemfd(let ino):
            try gmemFallocate(ino, mode: mode, offset: offset, length: length)
        case .memfd(let ino):
            if shmemInodes[ino]!.secret { throw .EOPNOTSUPP }  // secretmem has no fallocate op
            try shmemFallocate(ino, mode: mode, offset: offset, length: length)
        case .kvmDevice, .vm, .vcpu:
            throw .ENODEV  // not reached: vfsFallocateChecks refused them
        }
    }

    /// vfs_fallocate()'s checks, in its order: a file that is not regular is ENODEV
    /// before the size is checked against s_maxbytes.
    func vfsFallocateChecks(mode: UInt32, offset: UInt64, length: UInt64, regular: Bool) throws(Errno) {
        let off = Int64(bitPattern: offset)
        let len = Int64(bitPattern: length)
        if off < 0 || len <= 0 { throw .EINVAL }
        let modeMask: UInt32 =
            UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_COLLAPSE_RANGE | UAPI.FALLOC_FL_ZERO_RANGE
            | UAPI.FALLOC_FL_INSERT_RANGE | UAPI.FALLOC_FL_UNSHARE_RANGE | UAPI.FALLOC_FL_WRITE_ZEROES
        if mode & ~(modeMask | UAPI.FALLOC_FL_KEEP_SIZE) != 0 { throw .EOPNOTSUPP }
        let keep = mode & UAPI.FALLOC_FL_KEEP_SIZE != 0
        switch mode & modeMask {
        case 0, UAPI.FALLOC_FL_UNSHARE_RANGE, UAPI.FALLOC_FL_ZERO_RANGE:
            break
        case UAPI.FALLOC_FL_PUNCH_HOLE:
            if !keep { throw .EOPNOTSUPP }
        case UAPI.FALLOC_FL_COLLAPSE_RANGE, UAPI.FALLOC_FL_INSERT_RANGE, UAPI.FALLOC_FL_WRITE_ZEROES:
            if keep { throw .EOPNOTSUPP }
        default:
            throw .EOPNOTSUPP
        }
        if !regular { throw .ENODEV }
        // offset + len beyond s_maxbytes (or wrapping) is EFBIG.
        let (sum, overflow) = offset.addingReportingOverflow(length)
        if overflow || sum > UAPI.MAX_LFS_FILESIZE { throw .EFBIG }
    }

    /// kvm_gmem_fallocate().
    mutating func gmemFallocate(_ ino: UInt64, mode: UInt32, offset: UInt64, length: UInt64) throws(Errno) {
        if mode & UAPI.FALLOC_FL_KEEP_SIZE == 0 { throw .EOPNOTSUPP }
        if mode & ~(UAPI.FALLOC_FL_KEEP_SIZE | UAPI.FALLOC_FL_PUNCH_HOLE) != 0 { throw .EOPNOTSUPP }
        if offset & (UAPI.pageSize - 1) != 0 || length & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let range = (offset >> UAPI.pageShift)..<((offset + length) >> UAPI.pageShift)
        invalidateLock(ino, exclusive: true)
        if mode & UAPI.FALLOC_FL_PUNCH_HOLE != 0 {
            gmemPunchHole(ino, range)
        } else {
            try gmemAllocate(ino, range)
        }
    }

    /// kvm_gmem_allocate(): one folio per index, neither zeroed nor prepared.
    mutating func gmemAllocate(_ ino: UInt64, _ range: Range<UInt64>) throws(Errno) {
        // Allocation past EOF is refused before anything is allocated.
        if range.upperBound > gmemInodes[ino]!.pages { throw .EINVAL }
        let holes = gmemInodes[ino]!.state.runs(in: range).filter { $0.value == .hole }
        for run in holes {
            gmemInodes[ino]!.state.set(run.range, to: .allocated)
        }
    }

    /// kvm_gmem_punch_hole(): invalidate what maps the range (stage-2 in every bound VM,
    /// host page tables), then truncate. Punching past EOF is not an error: the range
    /// is clipped.
    mutating func gmemPunchHole(_ ino: UInt64, _ range: Range<UInt64>) {
        let pages = gmemInodes[ino]!.pages
        guard range.lowerBound < pages else { return }
        let clipped = range.lowerBound..<min(range.upperBound, pages)
        if !config.mutants.contains(.skipPunchZap) { gmemInvalidate(ino, clipped) }
        truncateGmemPages(ino, clipped)
    }

    /// kvm_gmem_invalidate_begin()/end(): zap the SPTEs of every binding of every file
    /// of the inode over `range`. mmu_invalidate_seq moves so racing faults retry.
    mutating func gmemInvalidate(_ ino: UInt64, _ range: Range<UInt64>) {
        zapHypervisorIOMMU(ino, range)
        for fileID in gmemInodes[ino]!.files {
            let g = gmemFiles[fileID]!
            guard let vm = g.vm else { continue }
            g.bindings.forEachRun(in: range) { r, slot in
                if let slot { zapGmemBinding(vm: vm, slot: slot, pgoffs: r) }
                return true
            }
        }
    }

    /// Hypervisor-managed IOMMUs mirror the guest's memory and hold no reference:
    /// whatever invalidates or frees the file's pages takes their entries with them.
    mutating func zapHypervisorIOMMU(_ ino: UInt64, _ range: Range<UInt64>) {
        for id in iommuDomains.keys where iommuDomains[id]!.model == .hypervisor {
            for (page, e) in iommuDomains[id]!.entries {
                if let g = e.gmemPage, g.inode == ino, range.contains(g.pgoff) {
                    iommuDomains[id]!.entries[page] = nil
                    counters.iommuEntriesZapped += 1
                }
            }
        }
    }

    /// truncate_inode_pages_range(): unmaps the pages from every host mapping and
    /// drops the page cache's reference.
    mutating func truncateGmemPages(_ ino: UInt64, _ range: Range<UInt64>) {
        unmapMappingRange(.guestMemfd(ino), pgoffs: range)
        for pgoff in gmemInodes[ino]!.folios.keys(in: range) {
            let pfn = gmemInodes[ino]!.folios.removeValue(forKey: pgoff)!
            phys.put(pfn)
        }
        gmemInodes[ino]!.state.set(range, to: .hole)
    }

    /// kvm_gmem_get_folio() + the uptodate handling of get_pfn and the user fault:
    /// returns the frame at `pgoff`, allocating it if needed and zeroing it once.
    /// A poisoned frame is EHWPOISON.
    mutating func gmemGetFolio(_ ino: UInt64, pgoff: UInt64) throws(Errno) -> UInt64 {
        if let pfn = gmemInodes[ino]!.folios[pgoff] {
            if phys[pfn].hwpoison { throw .EHWPOISON }
            return pfn
        }
        let pfn = phys.allocate()
        phys.zero(pfn)
        phys[pfn].gmemOwner = GmemPageRef(inode: ino, pgoff: pgoff)
        gmemInodes[ino]!.folios[pgoff] = pfn
        gmemInodes[ino]!.state.set(pgoff..<pgoff + 1, to: .uptodate)
        return pfn
    }

    // MARK: Release

    /// kvm_gmem_release(): the last reference to the file is gone. Every memslot bound
    /// to it loses its file (later faults exit with EFAULT), its SPTEs are zapped, and
    /// the VM reference is dropped. The memory belongs to the inode and lives on while
    /// another file refers to it.
    mutating func gmemRelease(file fileID: UInt64) {
        if let vm = gmemFiles[fileID]!.vm { slotsLock(vm) }
        invalidateLock(gmemFiles[fileID]!.inode, exclusive: true)
        let g = gmemFiles.removeValue(forKey: fileID)!
        if let vm = g.vm, vms[vm] != nil {
            // (With memslots holding the file, no binding is left by now.)
            g.bindings.forEachRun(in: 0..<UInt64.max) { r, slot in
                // A binding whose memslot is gone would be a write to freed memory
                // (the lifetime invariant reports it); the model cannot follow it.
                if let slot, vms[vm]!.memslots[slot]?.gmem?.file == fileID {
                    if !config.mutants.contains(.releaseWithoutZap) { zapGmemBinding(vm: vm, slot: slot, pgoffs: r) }
                    vms[vm]!.memslots[slot]!.gmem?.fileAlive = false
                }
                return true
            }
            vms[vm]!.mmuInvalidateSeq += 1
        }
        gmemInodes[g.inode]!.files.remove(fileID)
        if gmemInodes[g.inode]!.files.isEmpty {
            freeGmemInode(g.inode)
        }
        if let vm = g.vm, config.bindingOwnership == .fileHoldsVM { putVM(vm) }
    }

    /// evict_inode: the page cache goes away with the last file.
    mutating func freeGmemInode(_ ino: UInt64) {
        // Before the pages go back to the allocator, no device may still reach them.
        if !config.mutants.contains(.freeKeepsIOMMUEntries) { zapHypervisorIOMMU(ino, 0..<UInt64.max) }
        let inode = gmemInodes.removeValue(forKey: ino)!
        for (_, pfn) in inode.folios { phys.put(pfn) }
    }

    // MARK: Memory failure

    /// memory_failure() on the guest_memfd page at `offset`: the frame is marked
    /// poisoned, mappings of it are invalidated, and it is *not* truncated
    /// (kvm_gmem_error_folio returns MF_DELAYED). Later guest faults get EHWPOISON,
    /// host faults SIGBUS. A hole has no frame to poison: ENOENT.
    public mutating func memoryFailure(_ fd: Int32, offset: UInt64) throws(Errno) {
        let (_, f) = try file(fd)
        guard case .guestMemfd(let ino) = f.kind else { throw .EINVAL }
        if offset & (UAPI.pageSize - 1) != 0 || offset >= gmemInodes[ino]!.size { throw .EINVAL }
        let pgoff = offset >> UAPI.pageShift
        invalidateLock(ino, exclusive: false)  // kvm_gmem_error_folio()
        let pfn: UInt64
        if let existing = gmemInodes[ino]!.folios[pgoff] {
            pfn = existing
        } else {
            guard gmemInodes[ino]!.state.value(at: pgoff) != .hole else { throw .ENOENT }
            // The frame fallocate allocated, not yet zeroed.
            pfn = phys.allocate()
            phys[pfn].gmemOwner = GmemPageRef(inode: ino, pgoff: pgoff)
            gmemInodes[ino]!.folios[pgoff] = pfn
        }
        phys[pfn].hwpoison = true
        gmemInvalidate(ino, pgoff..<pgoff + 1)
        unmapMappingRange(.guestMemfd(ino), pgoffs: pgoff..<pgoff + 1)
    }

    // MARK: File operations

    /// fstat(2).
    public func fstat(_ fd: Int32) throws(Errno) -> FileStat {
        let (id, f) = try file(fd)
        switch f.kind {
        case .guestMemfd(let ino):
            // st_blocks is always 0: guest_memfd does not account blocks.
            return FileStat(size: gmemInodes[ino]!.size, blksize: UAPI.pageSize, blocks: 0, inode: ino)
        case .memfd(let ino):
            let s = shmemInodes[ino]!
            // secretmem adds its folios to the page cache without accounting blocks.
            return FileStat(size: s.size, blksize: UAPI.pageSize, blocks: s.secret ? 0 : s.allocatedPages * 8, inode: ino)
        case .kvmDevice, .vm, .vcpu:
            return FileStat(size: 0, blksize: UAPI.pageSize, blocks: 0, inode: id)
        }
    }

    /// read(2): guest_memfd and KVM files have no read op (EINVAL).
    public mutating func read(_ fd: Int32, count: UInt64) throws(Errno) -> [UInt8] {
        let (id, f) = try file(fd)
        guard case .memfd(let ino) = f.kind, !shmemInodes[ino]!.secret else { throw .EINVAL }  // secretmem: no read
        try rwVerifyArea(count: count, pos: f.position)
        let bytes = try shmemRead(ino, offset: f.position, count: count)
        files[id]!.position += UInt64(bytes.count)
        return bytes
    }

    /// write(2).
    public mutating func write(_ fd: Int32, _ bytes: [UInt8]) throws(Errno) -> UInt64 {
        let (id, f) = try file(fd)
        guard case .memfd(let ino) = f.kind, !shmemInodes[ino]!.secret else { throw .EINVAL }  // secretmem: no write
        try rwVerifyArea(count: UInt64(bytes.count), pos: f.position)
        try shmemWrite(ino, offset: f.position, bytes)
        files[id]!.position += UInt64(bytes.count)
        return UInt64(bytes.count)
    }

    /// pread(2): files without FMODE_PREAD are ESPIPE.
    public mutating func pread(_ fd: Int32, count: UInt64, offset: UInt64) throws(Errno) -> [UInt8] {
        // ksys_pread64() refuses a negative offset before it looks the fd up.
        if Int64(bitPattern: offset) < 0 { throw .EINVAL }
        let (_, f) = try file(fd)
        guard case .memfd(let ino) = f.kind, !shmemInodes[ino]!.secret else { throw .ESPIPE }  // secretmem: no FMODE_PREAD
        try rwVerifyArea(count: count, pos: offset)
        return try shmemRead(ino, offset: offset, count: count)
    }

    /// vfs_read()/vfs_write() before the transfer: access_ok() on the caller's buffer
    /// (no buffer of more than TASK_SIZE bytes exists: EFAULT), then rw_verify_area()
    /// (a count negative as ssize_t, or pos + count past LLONG_MAX: EINVAL).
    func rwVerifyArea(count: UInt64, pos: UInt64) throws(Errno) {
        if count > UAPI.TASK_SIZE_MAX { throw .EFAULT }
        if Int64(bitPattern: pos &+ count) < 0 { throw .EINVAL }
    }

    /// pwrite(2).
    public mutating func pwrite(_ fd: Int32, _ bytes: [UInt8], offset: UInt64) throws(Errno) -> UInt64 {
        if Int64(bitPattern: offset) < 0 { throw .EINVAL }
        let (_, f) = try file(fd)
        guard case .memfd(let ino) = f.kind, !shmemInodes[ino]!.secret else { throw .ESPIPE }
        try rwVerifyArea(count: UInt64(bytes.count), pos: offset)
        try shmemWrite(ino, offset: offset, bytes)
        return UInt64(bytes.count)
    }

    /// lseek(2): guest_memfd has no llseek (ESPIPE); KVM's own files use noop_llseek.
    public mutating func lseek(_ fd: Int32, offset: Int64, whence: Int32) throws(Errno) -> UInt64 {
        let (id, f) = try file(fd)
        // ksys_lseek(): a whence past SEEK_MAX is EINVAL before the file is asked.
        if whence < 0 || whence > UAPI.SEEK_HOLE { throw .EINVAL }
        switch f.kind {
        case .guestMemfd: throw .ESPIPE
        case .kvmDevice, .vm, .vcpu: return f.position
        case .memfd(let ino) where shmemInodes[ino]!.secret: throw .ESPIPE  // secretmem: no llseek
        case .memfd(let ino):
            let base: Int64
            switch whence {
            case UAPI.SEEK_SET: base = 0
            case UAPI.SEEK_CUR: base = Int64(f.position)
            case UAPI.SEEK_END: base = Int64(shmemInodes[ino]!.size)
            default:
                let pos = try shmemSeekData(ino, offset: offset, hole: whence == UAPI.SEEK_HOLE)
                files[id]!.position = pos
                return pos
            }
            let (pos, overflow) = base.addingReportingOverflow(offset)
            if overflow || pos < 0 { throw .EINVAL }
            files[id]!.position = UInt64(pos)
            return UInt64(pos)
        }
    }

    /// ftruncate(2): guest_memfd's setattr refuses every size change (EINVAL).
    /// do_sys_ftruncate() refuses a negative length before it looks the fd up.
    public mutating func ftruncate(_ fd: Int32, size: UInt64) throws(Errno) {
        if Int64(bitPattern: size) < 0 { throw .EINVAL }
        let (_, f) = try file(fd)
        switch f.kind {
        case .guestMemfd, .kvmDevice, .vm, .vcpu: throw .EINVAL
        case .memfd(let ino):
            // secretmem_setattr(): the size is set once.
            if shmemInodes[ino]!.secret && shmemInodes[ino]!.size != 0 { throw .EINVAL }
            shmemTruncate(ino, size: size)
        }
    }
}
