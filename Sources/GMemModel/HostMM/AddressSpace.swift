import GMemBackend

/// What a VMA maps.
enum VMABacking: Hashable {
    case anonymous
    /// A file: the open file the VMA holds, and the inode it reaches.
    case file(fileID: UInt64, object: MappedObject)
}

/// The object whose pages a file VMA maps (the address_space of the inode).
enum MappedObject: Hashable {
    case guestMemfd(UInt64)
    case shmem(UInt64)
    /// A vCPU's pages (kvm_vcpu_mmap): kvm_run at pgoff 0, the PIO page at 1, the
    /// coalesced-MMIO ring at 2; any other offset faults with SIGBUS.
    case kvmRun(vcpuFile: UInt64)
}

/// struct vm_area_struct.
struct VMA: Hashable {
    /// Distinguishes neighbouring VMAs that would otherwise coalesce.
    let id: UInt64
    let start: UInt64  // first virtual page number
    let backing: VMABacking
    /// pgoff of the VMA's first page.
    let pgoff: UInt64
    var prot: Protection
    let shared: Bool

    func pgoff(ofPage vpn: UInt64) -> UInt64 { pgoff + (vpn - start) }
}

/// A page-table entry.
struct PTE: Hashable {
    var pfn: UInt64
    var writable: Bool
}

/// The process's mm: VMAs by virtual page number, and page tables.
struct AddressSpace: Hashable {
    var vmas = RangeMap<VMA?>(nil)
    var ptes = PageMap<PTE>()
    /// The top of the mmap area: mappings go below it, the newest lowest, as the
    /// kernel's top-down allocator places them.
    static let mmapBase: UInt64 = 0x7f00_0000_0000 >> UAPI.pageShift
    /// mmap_min_addr: no mapping starts below 64 KiB.
    static let minVPN: UInt64 = 0x10000 >> UAPI.pageShift

    /// get_unmapped_area() for `pages` pages, top-down: the highest free gap below the
    /// mmap base that holds them and a guard page above, so a range a munmap freed is
    /// what the next mapping that fits takes (as on Linux, where a memslot that kept
    /// its userspace_addr then reaches the new mapping). nil when nothing fits.
    ///
    /// - Complexity: O(r) for the r runs of the VMA map below the base.
    func unmappedArea(pages: UInt64) -> UInt64? {
        var best: UInt64?
        vmas.forEachRun(in: Self.minVPN..<Self.mmapBase) { run, vma in
            if vma == nil, UInt64(run.count) >= pages + 1 { best = run.upperBound - 1 - pages }
            return true
        }
        return best
    }
}

/// A host process: its fd table and its mm.
struct Process: Hashable {
    var fds: [Int32: UInt64] = [:]
    /// No descriptor below this one is free (the kernel's fdtable keeps next_fd).
    var nextFD: Int32 = 3
    var mm = AddressSpace()
}

/// Why a host access faulted.
enum HostFault: Error {
    case sigbus(vpn: UInt64)
    case sigsegv(vpn: UInt64)
}

extension Kernel {
    // MARK: mmap / munmap

    /// mmap(2) of `fd` (or anonymous memory), at an address the model chooses.
    public mutating func mmap(fd: Int32?, offset: UInt64, length: UInt64, prot: Protection, shared: Bool)
        throws(Errno) -> Mapping
    {
        // sys_mmap() refuses an unaligned offset before it looks at the fd;
        // ksys_mmap_pgoff() then looks the fd up (EBADF) before do_mmap()'s checks.
        if offset & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let opened = try fd.map { fd throws(Errno) in try file(fd) }
        if length == 0 { throw .EINVAL }
        let (rounded, overflow) = length.addingReportingOverflow(UAPI.pageSize - 1)
        if overflow { throw .ENOMEM }  // PAGE_ALIGN(len) wrapped to 0
        if rounded > UAPI.TASK_SIZE_MAX { throw .ENOMEM }
        let pages = rounded >> UAPI.pageShift
        guard let start = mm.unmappedArea(pages: pages) else { throw .ENOMEM }  // get_unmapped_area()
        let pgoff = offset >> UAPI.pageShift

        let backing: VMABacking
        if let (fileID, f) = opened {
            // file_mmap_ok(): a regular file maps at most MAX_LFS_FILESIZE bytes, offset
            // included; any other file (KVM's anonymous inodes) ULONG_MAX.
            let limit: UInt64
            switch f.kind {
            case .guestMemfd, .memfd: limit = UAPI.MAX_LFS_FILESIZE
            case .kvmDevice, .vm, .vcpu: limit = UInt64.max
            }
            let bytes = pages << UAPI.pageShift
            if bytes > limit || pgoff > (limit - bytes) >> UAPI.pageShift { throw .EOVERFLOW }
            // mmap_region() accounts a private writable file mapping before the file's
            // mmap op runs (overcommit heuristic: more than RAM + swap is ENOMEM).
            let accounted = !shared && prot.contains(.write) && pages << UAPI.pageShift > config.commitLimit
            switch f.kind {
            case .guestMemfd(let ino):
                // guest_memfd's mount is noexec: do_mmap refuses VM_EXEC first.
                if prot.contains(.exec) { throw .EPERM }
                if accounted { throw .ENOMEM }
                guard gmemInodes[ino]!.supportsMmap else { throw .ENODEV }
                guard shared else { throw .EINVAL }
                backing = .file(fileID: fileID, object: .guestMemfd(ino))
            case .memfd(let ino):
                // secretmem: a noexec mount, and secretmem_mmap() wants MAP_SHARED.
                if shmemInodes[ino]!.secret && prot.contains(.exec) { throw .EPERM }
                if accounted { throw .ENOMEM }
                if shmemInodes[ino]!.secret && !shared { throw .EINVAL }
                backing = .file(fileID: fileID, object: .shmem(ino))
            case .kvmDevice, .vm:
                // Anonymous-inode files live on a noexec mount and have no mmap.
                if prot.contains(.exec) { throw .EPERM }
                throw .ENODEV
            case .vcpu:
                // kvm_vcpu_mmap() maps the vCPU's pages at any offset (the dirty ring,
                // the only offsets it checks, is not enabled by any scenario).
                if prot.contains(.exec) { throw .EPERM }
                backing = .file(fileID: fileID, object: .kvmRun(vcpuFile: fileID))
            }
            getFile(fileID)
        } else {
            backing = .anonymous
        }
        let vma = VMA(id: newID(), start: start, backing: backing, pgoff: pgoff, prot: prot, shared: shared)
        mm.vmas.set(start..<start + pages, to: vma)
        counters.vmasCreated += 1
        return Mapping(address: start << UAPI.pageShift, length: length)
    }

    /// munmap(2): page tables are torn down (with MMU notifiers) and file references
    /// dropped for every VMA the range removes entirely.
    public mutating func munmap(_ mapping: Mapping) throws(Errno) {
        let address = mapping.address
        if address & (UAPI.pageSize - 1) != 0 || mapping.length == 0 { throw .EINVAL }
        let first = address >> UAPI.pageShift
        let pages = (mapping.length + UAPI.pageSize - 1) >> UAPI.pageShift
        let (end, overflow) = first.addingReportingOverflow(pages)
        if overflow || end > (UAPI.TASK_SIZE_MAX >> UAPI.pageShift) { throw .EINVAL }
        let range = first..<end
        var affected: [VMA] = []
        mm.vmas.forEachRun(in: range) { _, vma in
            if let vma, affected.last?.id != vma.id { affected.append(vma) }
            return true
        }
        zapPTEs(pid: currentPID, range)
        mm.vmas.set(range, to: nil)
        for vma in affected {
            guard case .file(let fileID, _) = vma.backing else { continue }
            // The file reference goes with the last page of the VMA.
            if mm.vmas.firstIndex(in: 0..<UInt64.max, where: { $0?.id == vma.id }) == nil {
                putFile(fileID)
            }
        }
    }

    // MARK: Page tables

    /// Removes the PTEs of `range` in process `pid` (zap_page_range), after telling
    /// the secondary MMUs registered on that mm.
    /// Removes the PTEs in `range` (secondary MMUs are told first, over the whole
    /// range), except those `spare` keeps.
    mutating func zapPTEs(pid: UInt32, _ range: Range<UInt64>, sparing spare: ((UInt64, PTE) -> Bool)? = nil) {
        mmuNotifierInvalidate(pid: pid, range)
        for vpn in processes[pid]!.mm.ptes.keys(in: range) {
            if let spare, spare(vpn, processes[pid]!.mm.ptes[vpn]!) { continue }
            let pte = processes[pid]!.mm.ptes.removeValue(forKey: vpn)!
            phys[pte.pfn].mapcount -= 1
            phys.put(pte.pfn)
        }
    }

    /// unmap_mapping_range(): removes every PTE, in every VMA of every process, that
    /// maps pages `pgoffs` of `object` (the file's rmap spans processes: a forked
    /// child's shared mapping goes too). Without `evenCows` (a punch hole), a private
    /// mapping's copy-on-write copies stay; truncation (`evenCows`) takes them too.
    mutating func unmapMappingRange(_ object: MappedObject, pgoffs: Range<UInt64>, evenCows: Bool = true) {
        for pid in processes.keys.sorted() { unmapMappingRange(pid: pid, object, pgoffs: pgoffs, evenCows: evenCows) }
    }

    mutating func unmapMappingRange(pid: UInt32, _ object: MappedObject, pgoffs: Range<UInt64>, evenCows: Bool) {
        var ranges: [(Range<UInt64>, VMA)] = []
        processes[pid]!.mm.vmas.forEachRun(in: 0..<UInt64.max) { run, vma in
            guard let vma, case .file(_, let o) = vma.backing, o == object else { return true }
            // The VMA's pages that map pgoffs.
            let lo = max(vma.pgoff(ofPage: run.lowerBound), pgoffs.lowerBound)
            let hi = min(vma.pgoff(ofPage: run.upperBound - 1) + 1, pgoffs.upperBound)
            if lo < hi {
                let vlo = run.lowerBound + (lo - vma.pgoff(ofPage: run.lowerBound))
                ranges.append((vlo..<vlo + (hi - lo), vma))
            }
            return true
        }
        for (r, vma) in ranges {
            guard !evenCows, !vma.shared, case .shmem(let ino) = object else {
                zapPTEs(pid: pid, r)
                continue
            }
            // A PTE that maps anything but the page-cache page is a private COW copy.
            let cache = shmemInodes[ino]!.pages
            zapPTEs(pid: pid, r) { vpn, pte in cache[vma.pgoff(ofPage: vpn)] != pte.pfn }
        }
    }

    // MARK: Host faults

    /// handle_mm_fault(): the frame behind virtual page `vpn`, faulting it in.
    mutating func hostFault(vpn: UInt64, write: Bool) throws(HostFault) -> UInt64 {
        guard let vma = mm.vmas.value(at: vpn) else { throw .sigsegv(vpn: vpn) }
        if write ? !vma.prot.contains(.write) : vma.prot.isEmpty { throw .sigsegv(vpn: vpn) }
        if let pte = mm.ptes[vpn], pte.writable || !write { return pte.pfn }

        let pfn: UInt64
        var writable = vma.prot.contains(.write)
        switch vma.backing {
        case .anonymous:
            if mm.ptes[vpn] != nil { return breakCOW(vpn) }
            pfn = phys.allocate()  // the PTE's reference
            phys[pfn].mapcount = 1
            // A private read fault maps the zero page, read-only whatever the VMA
            // allows; the first write breaks COW (here: the frame, ours alone, turns
            // writable). Shared anonymous memory is shmem: its PTE takes the VMA's prot.
            mm.ptes[vpn] = PTE(pfn: pfn, writable: writable && (write || vma.shared))
            return pfn
        case .file(_, .guestMemfd(let ino)):
            pfn = try gmemFaultUserMapping(ino, pgoff: vma.pgoff(ofPage: vpn), vpn: vpn)
        case .file(_, .shmem(let ino)):
            let pgoff = vma.pgoff(ofPage: vpn)
            if pgoff >= (shmemInodes[ino]!.size + UAPI.pageSize - 1) >> UAPI.pageShift {
                throw .sigbus(vpn: vpn)
            }
            let cache = shmemGetPage(ino, pgoff: pgoff)
            if vma.shared {
                pfn = cache
            } else if write, let old = mm.ptes[vpn], old.pfn != cache {
                // Already a private copy, shared copy-on-write after fork.
                _ = old
                return breakCOW(vpn)
            } else if write {
                // A private file mapping: copy on write into an anonymous page. The PTE
                // changes page, so secondary MMUs that mapped the old one drop it.
                if mm.ptes[vpn] != nil { mmuNotifierInvalidate(pid: currentPID, vpn..<vpn + 1) }
                if let old = mm.ptes.removeValue(forKey: vpn) {
                    phys[old.pfn].mapcount -= 1
                    phys.put(old.pfn)
                }
                let copy = phys.allocate()
                phys.copy(from: cache, to: copy)
                phys[copy].mapcount = 1
                mm.ptes[vpn] = PTE(pfn: copy, writable: true)
                return copy
            } else {
                pfn = cache
                writable = false
            }
        case .file(_, .kvmRun):
            // kvm_vcpu_fault(): pages past the coalesced-MMIO ring are SIGBUS. The three
            // before it are KVM's own; the model does not keep their bytes (direct host
            // accesses to them are refused before they get here, see kvmRunPages).
            throw .sigbus(vpn: vpn)
        }
        if let old = mm.ptes[vpn], old.pfn == pfn {
            mm.ptes[vpn]!.writable = writable
            return pfn
        }
        phys.get(pfn)
        phys[pfn].mapcount += 1
        mm.ptes[vpn] = PTE(pfn: pfn, writable: writable)
        return pfn
    }

    /// Whether [address, address + count) touches one of a vCPU mapping's first three
    /// pages (kvm_run, PIO, coalesced MMIO), whose bytes are KVM's and not modelled.
    public func touchesKVMRunPages(address: UInt64, count: UInt64) -> Bool {
        guard count > 0 else { return false }
        let (end, overflow) = address.addingReportingOverflow(count)
        let last = overflow ? UInt64.max >> UAPI.pageShift : (end - 1) >> UAPI.pageShift
        var touches = false
        mm.vmas.forEachRun(in: (address >> UAPI.pageShift)..<last + 1) { run, vma in
            if let vma, case .file(_, .kvmRun) = vma.backing, vma.pgoff(ofPage: run.lowerBound) < 3 { touches = true }
            return !touches
        }
        return touches
    }

    /// kvm_gmem_fault_user_mapping(): SIGBUS past EOF, on private memory (mainline: the
    /// whole file unless INIT_SHARED; in-place: per page) and on poisoned pages; otherwise the folio,
    /// zeroed on first use.
    mutating func gmemFaultUserMapping(_ ino: UInt64, pgoff: UInt64, vpn: UInt64) throws(HostFault) -> UInt64 {
        invalidateLock(ino, exclusive: false)
        // Read what is needed and let go of the inode before gmemGetFolio mutates it:
        // a live copy would make the page-cache dictionary copy on write.
        let (pages, shared) = (gmemInodes[ino]!.pages, gmemInodes[ino]!.isShared(pgoff))
        if pgoff >= pages { throw .sigbus(vpn: vpn) }
        if !shared { throw .sigbus(vpn: vpn) }
        do {
            return try gmemGetFolio(ino, pgoff: pgoff)
        } catch {
            throw .sigbus(vpn: vpn)
        }
    }

    /// A host load or store of `count` bytes at `address`, page by page, stopping at
    /// the first page that faults (what memcpy through the mapping does).
    mutating func hostAccess(address: UInt64, count: UInt64, write bytes: [UInt8]?) -> HostAccess {
        if address.addingReportingOverflow(count).overflow { return .sigsegv(address: address) }
        var out: [UInt8] = []
        if bytes == nil { out.reserveCapacity(Int(min(count, 1 << 30))) }
        for c in PageChunks(start: address, count: count) {
            let pfn: UInt64
            do {
                pfn = try hostFault(vpn: c.page, write: bytes != nil)
            } catch .sigbus {
                return .sigbus(address: c.address)
            } catch {
                return .sigsegv(address: c.address)
            }
            if let bytes {
                phys.write(pfn, offset: c.offsetInPage, bytes[c.range])
            } else {
                phys.read(pfn, offset: c.offsetInPage, count: c.length, into: &out)
            }
        }
        return .completed(out)
    }
}

extension Kernel {
    /// A one-byte host load at `address` (for benchmarks and tools).
    public mutating func hostRead(address: UInt64) -> HostAccess {
        hostAccess(address: address, count: 1, write: nil)
    }
}

extension Kernel {
    // MARK: Copy on write and fork

    /// do_wp_page() on a present, write-protected private page: reuse it when this
    /// PTE is its only mapping (the page is exclusive to the process), else copy.
    /// Deciding by mapcount, not page_count, keeps a pinned page with the process that
    /// pinned it.
    mutating func breakCOW(_ vpn: UInt64) -> UInt64 {
        let old = mm.ptes[vpn]!
        let exclusive = phys[old.pfn].mapcount == 1
        // The mutant decides by page_count, as Linux did before the fix: a pin's extra
        // reference then forces a copy away from the pinned page.
        let reuse = config.mutants.contains(.cowIgnoresPins) ? exclusive && phys[old.pfn].refcount == 1 : exclusive
        if reuse {
            mm.ptes[vpn]!.writable = true
            return old.pfn
        }
        return copyPage(vpn, writable: true)
    }

    /// Gives `vpn` a copy of the page it maps, this process's alone (secondary MMUs
    /// drop the old one first): a COW break maps it writable, an unshare
    /// (FAULT_FLAG_UNSHARE) read-only.
    mutating func copyPage(_ vpn: UInt64, writable: Bool) -> UInt64 {
        let old = mm.ptes[vpn]!
        let copy = phys.allocate()
        phys.copy(from: old.pfn, to: copy)
        phys[copy].mapcount = 1
        mmuNotifierInvalidate(pid: currentPID, vpn..<vpn + 1)
        phys[old.pfn].mapcount -= 1
        phys.put(old.pfn)
        mm.ptes[vpn] = PTE(pfn: copy, writable: writable)
        return copy
    }

    /// fork(2): the child gets a copy of the fd table and the mm. Shared mappings map
    /// the same pages; private pages become copy-on-write in both, except pages that
    /// may be DMA-pinned, which the child gets a copy of at once so the pinning parent
    /// keeps its page writable (copy_present_page, the page_count/mapcount fix).
    public mutating func fork() -> UInt32 {
        let parent = currentPID
        let child = (processes.keys.max() ?? 1) + 1
        var p = processes[parent]!
        for id in p.fds.values { files[id]!.refs += 1 }
        var fileVMAs: Set<UInt64> = []
        p.mm.vmas.forEachRun(in: 0..<UInt64.max) { _, vma in
            if let vma, case .file(let fileID, _) = vma.backing, fileVMAs.insert(vma.id).inserted { files[fileID]!.refs += 1 }
            return true
        }
        for (vpn, pte) in p.mm.ptes.sorted(by: { $0.key < $1.key }) {
            guard let vma = p.mm.vmas.value(at: vpn) else { continue }
            let pinned = phys[pte.pfn].pincount > 0 && !config.mutants.contains(.cowIgnoresPins)
            if vma.shared {
                phys.get(pte.pfn)
                phys[pte.pfn].mapcount += 1
            } else if pinned {
                let copy = phys.allocate()
                phys.copy(from: pte.pfn, to: copy)
                phys[copy].mapcount = 1
                p.mm.ptes[vpn] = PTE(pfn: copy, writable: pte.writable)
            } else {
                phys.get(pte.pfn)
                phys[pte.pfn].mapcount += 1
                p.mm.ptes[vpn]!.writable = false
                processes[parent]!.mm.ptes[vpn]!.writable = false
            }
        }
        processes[child] = p
        return child
    }

    /// Makes `pid` the process that issues the following calls.
    public mutating func switchProcess(_ pid: UInt32) throws(Errno) {
        guard processes[pid] != nil else { throw .ESRCH }
        currentPID = pid
    }

    /// exit(2) of process `pid`: its mappings and descriptors go. The VMM (pid 1)
    /// cannot exit here: everything else is anchored to it.
    public mutating func exitProcess(_ pid: UInt32) throws(Errno) {
        guard pid != 1, processes[pid] != nil else { throw .ESRCH }
        let saved = currentPID
        currentPID = pid
        zapPTEs(pid: pid, 0..<(UAPI.TASK_SIZE_MAX >> UAPI.pageShift))
        var fileVMAs: [UInt64: UInt64] = [:]
        mm.vmas.forEachRun(in: 0..<UInt64.max) { _, vma in
            if let vma, case .file(let fileID, _) = vma.backing { fileVMAs[vma.id] = fileID }
            return true
        }
        for pin in pins where pin.value.pid == pid { try? unpin(pin.key) }
        for fd in Array(fds.keys) { try? close(fd) }
        processes[pid] = nil
        currentPID = saved == pid ? 1 : saved
        for (_, fileID) in fileVMAs { putFile(fileID) }
    }
}

extension Kernel {
    /// mprotect(2): changes the protection of [address, address + length). Removing
    /// write access write-protects the PTEs (secondary MMUs are told first); adding
    /// exec to a mapping of a noexec mount's file (guest_memfd, a vCPU, secretmem) is EACCES; any page
    /// without a VMA is ENOMEM.
    public mutating func mprotect(address: UInt64, length: UInt64, prot: Protection) throws(Errno) {
        if address & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let (end, overflow) = address.addingReportingOverflow(length)
        if overflow || end > UAPI.TASK_SIZE_MAX { throw .ENOMEM }
        let range = (address >> UAPI.pageShift)..<((end + UAPI.pageSize - 1) >> UAPI.pageShift)
        guard !range.isEmpty else { return }
        var runs: [(Range<UInt64>, VMA)] = []
        var hole = false
        mm.vmas.forEachRun(in: range) { r, vma in
            if let vma { runs.append((r, vma)) } else { hole = true }
            return !hole
        }
        if hole { throw .ENOMEM }
        for (_, vma) in runs {
            // Files on noexec mounts (guest_memfd, KVM's anonymous inodes) lost VM_MAYEXEC.
            guard prot.contains(.exec), case .file(_, let object) = vma.backing else { continue }
            switch object {
            case .guestMemfd, .kvmRun: throw .EACCES
            case .shmem(let ino): if shmemInodes[ino]!.secret { throw .EACCES }  // secretmem's mount is noexec
            }
        }
        // change_protection() rewrites the present PTEs under an MMU-notifier
        // invalidation, so secondary MMUs (KVM's stage-2) drop them and fault anew.
        if runs.contains(where: { $0.1.prot != prot }) { mmuNotifierInvalidate(pid: currentPID, range) }
        if !prot.contains(.write) {
            for vpn in mm.ptes.keys(in: range) { mm.ptes[vpn]!.writable = false }
        } else {
            // A shared mapping's new protection applies to its present PTEs too (shmem
            // and guest_memfd need no write notification): they become writable.
            for (r, vma) in runs where vma.shared {
                for vpn in mm.ptes.keys(in: r) { mm.ptes[vpn]!.writable = true }
            }
        }
        for (r, vma) in runs {
            var v = vma
            v.prot = prot
            mm.vmas.set(r, to: v)
        }
    }
}
