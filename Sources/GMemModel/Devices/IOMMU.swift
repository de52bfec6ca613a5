import GMemBackend

/// One IOMMU page-table entry: the frame a device reaches at an IOVA page, and how
/// it came to be mapped.
struct IOMMUEntry: Hashable {
    var pfn: UInt64
    /// VFIO: the long-term pin that holds the page.
    var pin: UInt64?
    /// Hypervisor-managed: the guest_memfd page it maps.
    var gmemPage: GmemPageRef?
    /// Nested: the GPA page stage-1 maps to (pfn unused: stage-2 resolves it).
    var gfn: UInt64?
}

/// A guest_memfd page by inode and offset.
struct GmemPageRef: Hashable {
    var inode: UInt64
    var pgoff: UInt64
}

/// An IOMMU domain: the address space one device (group) sees.
struct IOMMUDomain: Hashable {
    let model: IOMMUModel
    /// Nested: the VM whose stage-2 the device's stage-2 mirrors.
    var vm: UInt64?
    /// SVA: the process whose page tables the device walks (its entries are the IOTLB).
    var pid: UInt32?
    /// IOVA page -> entry.
    var entries = PageMap<IOMMUEntry>()
}

extension Kernel {
    /// Creates an IOMMU domain of `model`; a nested domain belongs to a VM.
    public mutating func createIOMMUDomain(_ model: IOMMUModel, vm fd: Int32? = nil) throws(Errno) -> UInt64 {
        var vm: UInt64?
        if model == .nested {
            guard let fd else { throw .EINVAL }
            vm = try vmFD(fd)
        }
        let id = newID()
        iommuDomains[id] = IOMMUDomain(model: model, vm: vm, pid: model == .sva ? currentPID : nil)
        return id
    }

    /// The MMU notifier's invalidate_range_start reaching SVA IOTLBs bound to `pid`.
    mutating func iotlbInvalidate(pid: UInt32, _ vpns: Range<UInt64>) {
        guard !config.mutants.contains(.svaIgnoresNotifier) else { return }
        for id in iommuDomains.keys where iommuDomains[id]!.model == .sva && iommuDomains[id]!.pid == pid {
            for vpn in iommuDomains[id]!.entries.keys(in: vpns) {
                iommuDomains[id]!.entries[vpn] = nil
                counters.iommuEntriesZapped += 1
            }
        }
    }

    /// Nested translation, stage-1: maps [iova, iova + length) to GPAs from `gpa`.
    /// Nothing is checked here: stage-2 decides at each DMA.
    public mutating func nestedMap(domain: UInt64, iova: UInt64, gpa: UInt64, length: UInt64) throws(Errno) {
        guard iommuDomains[domain]?.model == .nested else { throw .EINVAL }
        if iova & (UAPI.pageSize - 1) != 0 || gpa & (UAPI.pageSize - 1) != 0 || length & (UAPI.pageSize - 1) != 0 || length == 0 {
            throw .EINVAL
        }
        let first = iova >> UAPI.pageShift
        let pages = length >> UAPI.pageShift
        if pages > Self.maxIOMMUMapPages {
            throw refuse("an IOMMU mapping of \(pages) pages is over the model's limit of \(Self.maxIOMMUMapPages) pages a call")
        }
        if !iommuDomains[domain]!.entries.keys(in: first..<first + pages).isEmpty { throw .EEXIST }
        for i in 0..<pages {
            iommuDomains[domain]!.entries[first + i] = IOMMUEntry(pfn: 0, gfn: (gpa >> UAPI.pageShift) + i)
        }
    }

    /// VFIO_IOMMU_MAP_DMA: pins [address, address + length) of the current process
    /// long-term (FOLL_LONGTERM) and maps it at `iova`. Private guest_memfd memory
    /// cannot be pinned: EFAULT, nothing mapped.
    public mutating func vfioMapDMA(domain: UInt64, iova: UInt64, address: UInt64, length: UInt64) throws(Errno) {
        guard iommuDomains[domain]?.model == .vfio else { throw .EINVAL }
        if iova & (UAPI.pageSize - 1) != 0 || length & (UAPI.pageSize - 1) != 0 || length == 0 { throw .EINVAL }
        let first = iova >> UAPI.pageShift
        let pages = length >> UAPI.pageShift
        if !iommuDomains[domain]!.entries.keys(in: first..<first + pages).isEmpty { throw .EEXIST }
        let pin = try self.pin(address: address, length: length, longterm: true)
        for (i, pfn) in pins[pin]!.pfns.enumerated() {
            iommuDomains[domain]!.entries[first + UInt64(i)] = IOMMUEntry(pfn: pfn, pin: pin)
        }
    }

    /// A hypervisor-managed IOMMU map (pKVM-style, by hypercall): maps guest_memfd
    /// pages [offset, offset + length) of `fd` at `iova` after checking each is
    /// shared; a private page is EPERM and nothing is mapped. The mapping holds no
    /// refcount: the hypervisor refuses conversion of mapped pages instead. The check
    /// and the install run under filemap_invalidate_lock taken shared, as a host
    /// fault on the file does, so a to-private conversion cannot pass between them.
    public mutating func hypervisorIOMMUMap(domain: UInt64, iova: UInt64, fd: Int32, offset: UInt64, length: UInt64) throws(Errno) {
        try commitIOMMUMap(beginIOMMUMap(domain: domain, iova: iova, fd: fd, offset: offset, length: length))
    }

    /// First half of a hypervisor-managed IOMMU map: validate, take
    /// filemap_invalidate_lock shared, check every page is shared.
    public mutating func beginIOMMUMap(domain: UInt64, iova: UInt64, fd: Int32, offset: UInt64, length: UInt64) throws(Errno) -> PendingIOMMUMap {
        guard iommuDomains[domain]?.model == .hypervisor else { throw .EINVAL }
        let (fileID, f) = try file(fd)
        guard case .guestMemfd(let ino) = f.kind else { throw .EINVAL }
        if iova & (UAPI.pageSize - 1) != 0 || offset & (UAPI.pageSize - 1) != 0 || length & (UAPI.pageSize - 1) != 0 || length == 0 {
            throw .EINVAL
        }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > gmemInodes[ino]!.size { throw .EINVAL }
        let range = (offset >> UAPI.pageShift)..<(end >> UAPI.pageShift)
        if range.contains(where: { !gmemInodes[ino]!.isShared($0) }) && !config.mutants.contains(.iommuMapWithoutOwnershipCheck) {
            throw .EPERM
        }
        let first = iova >> UAPI.pageShift
        if !iommuDomains[domain]!.entries.keys(in: first..<first + UInt64(range.count)).isEmpty { throw .EEXIST }
        let locked = !config.mutants.contains(.iommuMapDropsInvalidateLock)
        if locked {
            invalidateLock(ino, exclusive: false)
            gmemInodes[ino]!.invalidateReaders += 1
        }
        // fdget(): the file (and its inode) outlives the call, even if closed meanwhile.
        getFile(fileID)
        return PendingIOMMUMap(domain: domain, ino: ino, file: fileID, range: range, firstIOVAPage: first, locked: locked)
    }

    /// Second half: install the entries, then drop the lock and the file.
    public mutating func commitIOMMUMap(_ p: PendingIOMMUMap) throws(Errno) {
        defer {
            if p.locked { gmemInodes[p.ino]!.invalidateReaders -= 1 }
            putFile(p.file)
        }
        for (i, pgoff) in p.range.enumerated() {
            let pfn = try gmemGetFolio(p.ino, pgoff: pgoff)
            iommuDomains[p.domain]!.entries[p.firstIOVAPage + UInt64(i)] = IOMMUEntry(pfn: pfn, gmemPage: GmemPageRef(inode: p.ino, pgoff: pgoff))
        }
    }

    /// The translation model of domain `id`, or nil if there is none.
    public func iommuModel(ofDomain id: UInt64) -> IOMMUModel? { iommuDomains[id]?.model }

    /// Unmaps [iova, iova + length): VFIO unpins, the hypervisor forgets the mapping.
    public mutating func iommuUnmap(domain: UInt64, iova: UInt64, length: UInt64) throws(Errno) {
        guard iommuDomains[domain] != nil else { throw .EINVAL }
        if iova & (UAPI.pageSize - 1) != 0 || length & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let first = iova >> UAPI.pageShift
        let (last, overflow) = first.addingReportingOverflow(length >> UAPI.pageShift)
        if overflow { throw .EINVAL }
        let entries = iommuDomains[domain]!.entries
        if iommuDomains[domain]!.model == .vfio {
            // VFIO type1 v2 refuses an unmap that would split a mapping: its range must
            // start and end on mapping boundaries (a mapping is one MAP_DMA, one pin).
            func samePin(_ a: UInt64, _ b: UInt64) -> Bool {
                guard let x = entries[a]?.pin, let y = entries[b]?.pin else { return false }
                return x == y
            }
            if first > 0 && samePin(first - 1, first) { throw .EINVAL }
            if last > first && last < UInt64.max && samePin(last - 1, last) { throw .EINVAL }
        }
        // The entries present, not every page of the range: the cost is what is mapped.
        var unpinned: Set<UInt64> = []
        for page in entries.keys(in: first..<last) {
            guard let e = iommuDomains[domain]!.entries.removeValue(forKey: page) else { continue }
            counters.iommuEntriesZapped += 1
            if let p = e.pin, unpinned.insert(p).inserted {
                // VFIO unpins what it pinned for this mapping: the whole mapping is in range.
                try? unpin(p)
            }
        }
    }

    /// The most pages one nested IOMMU map may create (a model bound: each is an entry).
    static let maxIOMMUMapPages: UInt64 = 1 << 24

    /// A device's DMA through its IOMMU: EFAULT (an IOMMU fault) where nothing is
    /// mapped; else the bytes of the frames mapped.
    public mutating func dma(domain: UInt64, iova: UInt64, write bytes: [UInt8]?, count: UInt64) throws(Errno) -> [UInt8] {
        guard iommuDomains[domain] != nil else { throw .EINVAL }
        if iova.addingReportingOverflow(count).overflow { throw .EFAULT }
        try checkTransfer(count, bytes == nil ? "a DMA read" : "a DMA write")
        var out: [UInt8] = []
        for c in PageChunks(start: iova, count: count) {
            if iommuDomains[domain]!.model == .sva && iommuDomains[domain]!.entries[c.page] == nil {
                // IOTLB miss: walk the process's page tables, faulting the page in as a
                // page request would (PRI); what the CPU could not touch, the device cannot.
                let pid = iommuDomains[domain]!.pid!
                guard processes[pid] != nil else { throw .EFAULT }
                if isOutsideDirectMapIn(pid: pid, c.page) { throw .EFAULT }
                let saved = currentPID
                currentPID = pid
                defer { currentPID = saved }
                do {
                    let pfn = try hostFault(vpn: c.page, write: bytes != nil)
                    iommuDomains[domain]!.entries[c.page] = IOMMUEntry(pfn: pfn)
                } catch {
                    throw .EFAULT
                }
            }
            guard var e = iommuDomains[domain]!.entries[c.page] else { throw .EFAULT }
            if let gfn = e.gfn, let vm = iommuDomains[domain]!.vm {
                // Stage-2 for devices maps shared memory only, as the CPU's does for
                // shared accesses; a private gfn is a stage-2 fault.
                guard vms[vm] != nil, !kvmMemIsPrivate(vm: vm, gfn: gfn) else { throw .EFAULT }
                do {
                    e.pfn = try stage2Page(vm: vm, gfn: gfn, write: bytes != nil, isPrivate: false)
                } catch {
                    throw .EFAULT
                }
            }
            if let bytes {
                phys.write(e.pfn, offset: c.offsetInPage, bytes[c.range])
            } else {
                phys.read(e.pfn, offset: c.offsetInPage, count: c.length, into: &out)
            }
        }
        return out
    }

    /// The first page of `range` of inode `ino` that a hypervisor-managed IOMMU maps.
    func firstIOMMUMappedPage(_ ino: UInt64, _ range: Range<UInt64>) -> UInt64? {
        var first: UInt64?
        for (_, d) in iommuDomains where d.model == .hypervisor {
            for (_, e) in d.entries {
                if let g = e.gmemPage, g.inode == ino, range.contains(g.pgoff), first.map({ g.pgoff < $0 }) ?? true {
                    first = g.pgoff
                }
            }
        }
        return first
    }
}

/// A hypervisor-managed IOMMU map between its ownership check and its install.
public struct PendingIOMMUMap: Hashable, Sendable {
    let domain: UInt64
    let ino: UInt64
    /// The file the call holds a reference on (fdget).
    let file: UInt64
    let range: Range<UInt64>
    let firstIOVAPage: UInt64
    /// Holds filemap_invalidate_lock shared (unless a mutant dropped it).
    let locked: Bool
}
