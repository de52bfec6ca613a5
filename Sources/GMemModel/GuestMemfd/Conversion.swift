import GMemBackend

/// A GUP pin (pin_user_pages): the frames it holds a reference and a pin count on.
struct Pin: Hashable {
    var pfns: [UInt64]
    var longterm: Bool
    /// The pinning process and the virtual page of `pfns[0]`.
    var pid: UInt32
    var firstVPN: UInt64
}

/// A GUP-fast speculative reference: taken on what the page table showed, before
/// the recheck that would drop it.
struct SpeculativeRef: Hashable {
    var pfns: [UInt64]
}

extension Kernel {
    // MARK: In-place conversion

    /// KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd (the in-place series, post-6.18).
    ///
    /// to-private unmaps the range from every host mapping, then refuses with EAGAIN
    /// (error_offset: the first page still in use) if any page is still pinned or holds
    /// extra references; nothing changes then. to-shared has no check. Either way the
    /// stage-2 entries of the old state are zapped. Contents are preserved: the model's
    /// platforms (sw_protected, default) do not scrub on conversion.
    public mutating func setGuestMemfdAttributes(_ fd: Int32, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        -> ConversionOutcome
    {
        let (pending, outcome) = prepareConversion(fd, offset: offset, size: size, attributes: attributes, flags: flags)
        if let pending { commitConversion(pending) }
        return outcome
    }

    /// The conversion up to its flip: validation, and for to-private the unmap and
    /// the refcount check (the kernel holds filemap_invalidate_lock from here to the
    /// flip). Returns the flip still to do, or nil with the outcome when the
    /// conversion ends here (an error, EAGAIN, or nothing to change).
    mutating func prepareConversion(_ fd: Int32, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64)
        -> (PendingConversion?, ConversionOutcome)
    {
        let done = ConversionOutcome(errno: nil, errorOffset: 0)
        do {
            try convertChecks(fd, offset: offset, size: size, attributes: attributes, flags: flags)
        } catch {
            return (nil, ConversionOutcome(errno: error, errorOffset: 0))
        }
        guard case .guestMemfd(let ino)? = fds[fd].flatMap({ files[$0]?.kind }) else {
            return (nil, ConversionOutcome(errno: .EBADF, errorOffset: 0))
        }
        let range = (offset >> UAPI.pageShift)..<((offset + size) >> UAPI.pageShift)
        invalidateLock(ino, exclusive: true)
        let toPrivate = attributes & UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
        // Nothing to do when the whole range already has the value.
        if gmemInodes[ino]!.privatePages.allEqual(in: range, to: toPrivate) { return (nil, done) }
        if toPrivate {
            unmapMappingRange(.guestMemfd(ino), pgoffs: range)
            if !config.mutants.contains(.skipRefcountCheck), let busy = firstPageInUse(ino, range) {
                counters.conversionsRefused += 1
                return (nil, ConversionOutcome(errno: .EAGAIN, errorOffset: busy << UAPI.pageShift))
            }
            // A hypervisor-managed IOMMU holds no reference; the hypervisor refuses.
            if let mapped = firstIOMMUMappedPage(ino, range) {
                counters.conversionsRefused += 1
                return (nil, ConversionOutcome(errno: .EAGAIN, errorOffset: mapped << UAPI.pageShift))
            }
        }
        return (PendingConversion(ino: ino, range: range, toPrivate: toPrivate, vm: gmemFiles[fds[fd]!]?.vm ?? nil), done)
    }

    /// The flip: zap the old state's stage-2 entries, record the new state, and on
    /// TDX/SNP-like platforms scrub (the page is re-keyed: its old contents are gone).
    mutating func commitConversion(_ p: PendingConversion) {
        gmemInvalidate(p.ino, p.range)
        gmemInodes[p.ino]!.privatePages.set(p.range, to: p.toPrivate)
        counters.conversionsDone += 1
        if let vm = p.vm, vms[vm]!.type.conversionIsLossy, !config.mutants.contains(.lossyConversionWithoutZeroing) {
            for pgoff in gmemInodes[p.ino]!.folios.keys(in: p.range) { phys.zero(gmemInodes[p.ino]!.folios[pgoff]!) }
        }
    }

    /// The post-merge validation, in its order. ENOTTY where the ioctl does not exist
    /// (not a guest_memfd, or a VM without in-place conversion).
    func convertChecks(_ fd: Int32, offset: UInt64, size: UInt64, attributes: UInt64, flags: UInt64) throws(Errno) {
        let (fileID, f) = try file(fd)
        guard case .guestMemfd(let ino) = f.kind, let vm = gmemFiles[fileID]?.vm, vms[vm]?.conversion == .inPlace else {
            // An ioctl number the file does not know: kvm_vcpu_ioctl() and
            // kvm_dev_ioctl() end in their arch defaults (EINVAL), the rest in ENOTTY.
            switch f.kind {
            case .vcpu:
                _ = try vcpuFD(fd)  // EIO from another mm first
                throw .EINVAL
            case .kvmDevice: throw .EINVAL
            case .vm:
                _ = try vmFD(fd)
                throw .ENOTTY
            case .guestMemfd, .memfd: throw .ENOTTY
            }
        }
        if flags != 0 { throw .EINVAL }
        if !vms[vm]!.type.hasPrivateMemory { throw .EINVAL }
        if attributes & ~UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 { throw .EINVAL }
        let (end, overflow) = offset.addingReportingOverflow(size)
        if size == 0 || overflow || offset & (UAPI.pageSize - 1) != 0 || size & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let isize = gmemInodes[ino]!.size
        if offset >= isize || end > isize { throw .EINVAL }
    }

    /// The refcount check (kvm_gmem_is_safe_for_conversion): a folio in range that is
    /// maybe-DMA-pinned, still mapped, or referenced beyond the page cache's own
    /// reference. Returns the first such page offset.
    ///
    /// - Complexity: O(min(range, faulted pages)) plus a sort of the busy candidates.
    func firstPageInUse(_ ino: UInt64, _ range: Range<UInt64>) -> UInt64? {
        gmemInodes[ino]!.folios.keys(in: range).filter { pgoff in
            let frame = phys[gmemInodes[ino]!.folios[pgoff]!]
            return frame.pincount > 0 || frame.mapcount > 0 || frame.refcount != 1
        }.min()
    }

    // MARK: GUP pins

    /// The most pages one pin_user_pages() call may fault in (a model bound).
    static let maxGUPPages: UInt64 = 1 << 20

    /// The virtual pages that [start, end) touches, for a non-empty range (no overflow
    /// at the top of the address space).
    static func pages(from start: UInt64, to end: UInt64) -> Range<UInt64> {
        (start >> UAPI.pageShift)..<(((end - 1) >> UAPI.pageShift) + 1)
    }

    /// pin_user_pages(FOLL_WRITE [| FOLL_LONGTERM]) on [address, address + length):
    /// faults each page in for write and takes a reference and a pin on it. Pages the
    /// host cannot fault (private guest_memfd, holes past EOF) make the whole call
    /// EFAULT, with nothing left pinned.
    ///
    /// A read-only pin (no FOLL_WRITE) faults for read, and must not leave the holder
    /// looking at a page the process may later replace (gup_must_unshare()): an
    /// anonymous page it may share (after fork) is unshared first, and so, for a
    /// long-term pin (FOLL_LONGTERM), is a page-cache page in a private mapping, which
    /// the process's first write would otherwise COW away from the pin.
    public mutating func pin(address: UInt64, length: UInt64, longterm: Bool, write: Bool = true) throws(Errno) -> UInt64 {
        let (end, overflow) = address.addingReportingOverflow(length)
        if length == 0 || overflow || address & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        let vpns = Self.pages(from: address, to: end)
        if UInt64(vpns.count) > Self.maxGUPPages {
            throw refuse("pinning \(vpns.count) pages is over the model's limit of \(Self.maxGUPPages) pages a call (each is faulted in)")
        }
        var pfns: [UInt64] = []
        for vpn in vpns {
            if isOutsideDirectMap(vpn) {
                for pfn in pfns { unpinFrame(pfn) }
                throw .EFAULT
            }
            do {
                var pfn = try hostFault(vpn: vpn, write: write)
                // FAULT_FLAG_UNSHARE: a copy of its own, still read-only (unsharing is not writing).
                if !write && mustUnshare(vpn: vpn, pfn: pfn, longterm: longterm) { pfn = copyPage(vpn, writable: false) }
                phys.get(pfn)
                phys[pfn].pincount += 1
                pfns.append(pfn)
            } catch {
                for pfn in pfns { unpinFrame(pfn) }
                throw .EFAULT
            }
        }
        let id = newID()
        pins[id] = Pin(pfns: pfns, longterm: longterm, pid: currentPID, firstVPN: address >> UAPI.pageShift)
        return id
    }

    /// gup_must_unshare() for a read-only pin of `pfn` at `vpn`: in a private mapping,
    /// an anonymous page that is not exclusively this process's (mapcount > 1), or,
    /// long-term, a page-cache page still mapped in place of a COW copy.
    func mustUnshare(vpn: UInt64, pfn: UInt64, longterm: Bool) -> Bool {
        guard let vma = mm.vmas.value(at: vpn), !vma.shared else { return false }
        switch vma.backing {
        case .anonymous: return phys[pfn].mapcount > 1
        case .file(_, .shmem(let ino)): return longterm && shmemInodes[ino]!.pages[vma.pgoff(ofPage: vpn)] == pfn
        case .file: return false
        }
    }

    /// GUP-fast's first half: walk the page tables without locks and take a
    /// reference on each page present (no fault, no pin). Until `dropSpeculativeRefs`
    /// (the recheck failing, or the caller finishing), the pages carry an extra
    /// reference that a conversion's refcount check sees. EFAULT where a page is not
    /// mapped (GUP-fast would fall back to the slow path, which faults).
    public mutating func gupFastReference(address: UInt64, length: UInt64) throws(Errno) -> UInt64 {
        let (end, overflow) = address.addingReportingOverflow(length)
        if length == 0 || overflow || address & (UAPI.pageSize - 1) != 0 { throw .EINVAL }
        var pfns: [UInt64] = []
        // GUP-fast stops at the first page not present, so the walk costs what is mapped.
        for vpn in Self.pages(from: address, to: end) {
            guard let walked = gupFastWalk(address: vpn << UAPI.pageShift, write: false) else {
                for pfn in pfns { phys.put(pfn) }
                throw .EFAULT
            }
            phys.get(walked.pte.pfn)
            pfns.append(walked.pte.pfn)
        }
        let id = newID()
        speculativeRefs[id] = SpeculativeRef(pfns: pfns)
        return id
    }

    /// GUP-fast's recheck and put_page(): drops the speculative references.
    public mutating func dropSpeculativeRefs(_ id: UInt64) throws(Errno) {
        guard let r = speculativeRefs.removeValue(forKey: id) else { throw .EINVAL }
        for pfn in r.pfns { phys.put(pfn) }
    }

    /// check_vma_flags(): secretmem (and NO_DIRECT_MAP guest_memfd) pages are not in
    /// the direct map, so GUP, slow or fast, refuses them.
    func isOutsideDirectMap(_ vpn: UInt64) -> Bool { isOutsideDirectMapIn(pid: currentPID, vpn) }

    func isOutsideDirectMapIn(pid: UInt32, _ vpn: UInt64) -> Bool {
        guard let vma = processes[pid]?.mm.vmas.value(at: vpn), case .file(_, let object) = vma.backing else { return false }
        switch object {
        case .shmem(let ino): return shmemInodes[ino]!.secret
        case .guestMemfd(let ino): return gmemInodes[ino]!.noDirectMap
        case .kvmRun: return false
        }
    }

    /// unpin_user_pages().
    public mutating func unpin(_ id: UInt64) throws(Errno) {
        guard let p = pins.removeValue(forKey: id) else { throw .EINVAL }
        for pfn in p.pfns { unpinFrame(pfn) }
    }

    mutating func unpinFrame(_ pfn: UInt64) {
        phys[pfn].pincount -= 1
        phys.put(pfn)
    }
}
