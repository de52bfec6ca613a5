import GMemBackend

/// Deliberately broken variants of the model, selectable by name, to show that the
/// invariant checker (and later the explorer) catches what it claims to.
public enum Mutant: String, CaseIterable, Hashable, Sendable {
    /// In-place to-private converts even when pages are pinned.
    case skipRefcountCheck = "skip-refcount-check"
    /// Punch-hole truncates without zapping the stage-2 first.
    case skipPunchZap = "skip-punch-zap"
    /// Attribute changes do not zap the old side's stage-2 entries.
    case skipAttributeZap = "skip-attribute-zap"
    /// Releasing a guest_memfd leaves the SPTEs it backed in place.
    case releaseWithoutZap = "release-without-zap"
    /// A hypervisor-managed IOMMU maps pages without checking they are shared.
    case iommuMapWithoutOwnershipCheck = "iommu-map-without-ownership-check"
    /// pKVM donates a page to a guest without taking it out of the host's stage-2.
    case pkvmDonateKeepsHostAccess = "pkvm-donate-keeps-host-access"
    /// SNP/TDX-like in-place conversion keeps the contents instead of zeroing them.
    case lossyConversionWithoutZeroing = "lossy-conversion-without-zeroing"
    /// pKVM hands a reclaimed guest page back without scrubbing it.
    case pkvmReclaimWithoutScrub = "pkvm-reclaim-without-scrub"
    /// Deleting a memslot punches the file range it bound.
    case unbindDiscards = "unbind-discards"
    /// SVA IOTLBs are not told about page-table changes (no MMU notifier).
    case svaIgnoresNotifier = "sva-ignores-notifier"
    /// Freeing a guest_memfd's pages (its last close) leaves the hypervisor-managed
    /// IOMMU's entries for them: a device keeps reaching freed memory.
    case freeKeepsIOMMUEntries = "free-keeps-iommu-entries"
    /// fork shares pinned pages copy-on-write and COW decides by page_count: the
    /// pinning process's next write moves it off the page its device still sees.
    case cowIgnoresPins = "cow-ignores-pins"
    /// A fault installs the SPTE it resolved without rechecking mmu_invalidate_seq
    /// (is_page_fault_stale()), so an invalidation that ran while it resolved is lost.
    case skipFaultRetry = "skip-fault-retry"
    /// GUP-fast keeps the pin it took without rechecking that the PTE it read is
    /// still there (gup_fast_pte_range()'s recheck), so a conversion that unmapped the
    /// page and found no extra reference is followed by a pin on a private page.
    case gupFastSkipRecheck = "gup-fast-skip-recheck"
    /// In-place to-private drops filemap_invalidate_lock between its refcount check
    /// and the flip, so a host fault can map the page in between.
    case conversionDropsInvalidateLock = "conversion-drops-invalidate-lock"
    /// Deleting a memslot leaves its guest_memfd binding in place when the file is
    /// being released (the code before "KVM: guest_memfd: Remove bindings on memslot
    /// deletion when gmem is dying"): release then writes to the freed memslot.
    case unbindSkipsDyingFile = "unbind-skips-dying-file"
    /// A memslot deletion frees the slot without waiting (synchronize_srcu) for
    /// vCPUs still inside a fault that looked it up: the fault installs an SPTE for
    /// a memslot that is gone, and the flush that should have removed it is over.
    case memslotDeleteSkipsSRCUWait = "memslot-delete-skips-srcu-wait"
    /// A hypervisor-managed IOMMU map checks that the pages are shared without
    /// holding filemap_invalidate_lock to its install, so a to-private conversion
    /// passes in between and the device maps a private page.
    case iommuMapDropsInvalidateLock = "iommu-map-drops-invalidate-lock"

    /// Mutants that only a race shows: no sequential scenario can catch them, the
    /// explorer does (an operation must run between two steps of another).
    public var needsInterleaving: Bool {
        [.skipFaultRetry, .gupFastSkipRecheck, .conversionDropsInvalidateLock, .unbindSkipsDyingFile, .iommuMapDropsInvalidateLock,
         .memslotDeleteSkipsSRCUWait].contains(self)
    }
}

extension Kernel {
    /// Checks isolation, coherence and lifetime over the whole system now.
    ///
    /// Strings are built only for what is broken: the explorer runs this on every
    /// state it reaches.
    ///
    /// - Complexity: O((faulted pages + PTEs + SPTEs + pinned pages + IOMMU entries)
    ///   x log n).
    public func checkSystemInvariants() -> [Violation] {
        var out: [Violation] = []
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

        // Isolation: who reaches each private guest_memfd frame. One pass over each
        // kind of mapping, keeping only hits on a private frame.
        var privateFrames: [UInt64: (ino: UInt64, pgoff: UInt64)] = [:]
        for (ino, inode) in gmemInodes {
            for (pgoff, pfn) in inode.folios where !inode.isShared(pgoff) { privateFrames[pfn] = (ino, pgoff) }
        }
        var reachedBy: [UInt64: (host: [String], pins: [UInt64], devices: [String], vms: [String])] = [:]
        if !privateFrames.isEmpty {
            for (pid, p) in processes.sorted(by: { $0.key < $1.key }) {
                for (vpn, pte) in p.mm.ptes where privateFrames[pte.pfn] != nil {
                    reachedBy[pte.pfn, default: ([], [], [], [])].host.append("process \(pid) PTE at \(hex(vpn << 12))")
                }
            }
            for (id, pin) in pins.sorted(by: { $0.key < $1.key }) {
                for pfn in pin.pfns where privateFrames[pfn] != nil { reachedBy[pfn, default: ([], [], [], [])].pins.append(id) }
            }
            for (domainID, d) in iommuDomains.sorted(by: { $0.key < $1.key }) {
                for (iovaPage, e) in d.entries where privateFrames[e.pfn] != nil {
                    reachedBy[e.pfn, default: ([], [], [], [])].devices.append("IOMMU domain \(domainID) (\(d.model.rawValue)) iova \(hex(iovaPage << 12))")
                }
            }
            for (vmID, vm) in vms.sorted(by: { $0.key < $1.key }) {
                for (gfn, spte) in vm.spte {
                    guard let page = privateFrames[spte.pfn] else { continue }
                    // The VMs whose files view this inode may map it; no other.
                    let owners = gmemInodes[page.ino]!.files.compactMap { gmemFiles[$0]?.vm ?? nil }
                    if !owners.contains(vmID) { reachedBy[spte.pfn, default: ([], [], [], [])].vms.append("VM \(vmID) gfn \(hex(gfn))") }
                }
            }
        }
        for (pfn, r) in reachedBy.sorted(by: { (privateFrames[$0.key]!.ino, privateFrames[$0.key]!.pgoff) < (privateFrames[$1.key]!.ino, privateFrames[$1.key]!.pgoff) }) {
            let (ino, pgoff) = privateFrames[pfn]!
            let page = "guest_memfd inode \(ino) offset \(hex(pgoff << 12)) (pfn \(hex(pfn)))"
            if !r.host.isEmpty {
                out.append(Violation(invariant: .isolation, page: page, parties: r.host, detail: "private page mapped by host userspace"))
            }
            if !r.pins.isEmpty {
                out.append(Violation(invariant: .isolation, page: page, parties: r.pins.map { "GUP pin \($0)" }, detail: "private page pinned by the host"))
            }
            for d in r.devices {
                out.append(Violation(invariant: .isolation, page: page, parties: [d], detail: "private page reachable by a device"))
            }
            for v in r.vms {
                out.append(Violation(invariant: .isolation, page: page, parties: [v], detail: "private page mapped into another VM"))
            }
        }

        // Coherence: every SPTE points at the page its backing holds now.
        for (vmID, vm) in vms.sorted(by: { $0.key < $1.key }) {
            for (gfn, spte) in vm.spte { checkSPTE(vm: vmID, vm, gfn: gfn, spte, into: &out) }
        }

        // Coherence of IOMMU entries that name a guest_memfd page: the device sees the
        // page the file holds there now.
        for (domainID, d) in iommuDomains.sorted(by: { $0.key < $1.key }) {
            for (iovaPage, e) in d.entries.sorted(by: { $0.key < $1.key }) {
                guard let g = e.gmemPage else { continue }
                let party = "IOMMU domain \(domainID) iova 0x\(String(iovaPage << 12, radix: 16)) -> pfn 0x\(String(e.pfn, radix: 16))"
                let now = gmemInodes[g.inode]?.folios[g.pgoff]
                if now != e.pfn {
                    out.append(Violation(invariant: .coherence, page: "guest_memfd inode \(g.inode) offset 0x\(String(g.pgoff << 12, radix: 16))",
                        parties: [party], detail: now.map { "the file now holds pfn 0x\(String($0, radix: 16))" } ?? "the file holds no page there"))
                }
            }
        }

        // Coherence of SVA IOTLBs: a cached translation is what the process maps now.
        for (domainID, d) in iommuDomains.sorted(by: { $0.key < $1.key }) where d.model == .sva {
            for (vpn, e) in d.entries.sorted(by: { $0.key < $1.key }) {
                let now = d.pid.flatMap { processes[$0]?.mm.ptes[vpn]?.pfn }
                if now != e.pfn {
                    out.append(Violation(invariant: .coherence, page: "process \(d.pid ?? 0) address 0x\(String(vpn << 12, radix: 16))",
                        parties: ["SVA IOTLB of domain \(domainID) -> pfn 0x\(String(e.pfn, radix: 16))"],
                        detail: now.map { "the process now maps pfn 0x\(String($0, radix: 16))" } ?? "the process no longer maps it"))
                }
            }
        }

        // Coherence of pins: a pinned page is the page the pinning process maps there,
        // so a device and the CPU see the same memory.
        for (id, pin) in pins.sorted(by: { $0.key < $1.key }) {
            guard let p = processes[pin.pid] else { continue }
            for (i, pfn) in pin.pfns.enumerated() {
                let vpn = pin.firstVPN + UInt64(i)
                if let pte = p.mm.ptes[vpn], pte.pfn != pfn {
                    out.append(Violation(invariant: .coherence, page: "process \(pin.pid) address 0x\(String(vpn << 12, radix: 16))",
                        parties: ["GUP pin \(id) -> pfn 0x\(String(pfn, radix: 16))", "PTE -> pfn 0x\(String(pte.pfn, radix: 16))"],
                        detail: "the CPU maps a different page than the pin holds"))
                }
            }
        }

        out += pkvm.violations()

        // Lifetime: bindings and VMAs refer to live objects.
        for (vmID, vm) in vms {
            for (id, slot) in vm.memslots {
                if let b = slot.gmem, b.fileAlive, gmemFiles[b.file] == nil {
                    out.append(Violation(invariant: .lifetime, page: "memslot \(id)", parties: ["VM \(vmID)"],
                        detail: "binding to a released guest_memfd file"))
                }
            }
        }
        // The memslot side of each binding a guest_memfd file holds must still exist:
        // kvm_gmem_release() writes slot->gmem.file of every binding it finds.
        for (fileID, g) in gmemFiles.sorted(by: { $0.key < $1.key }) {
            guard let vm = g.vm, let v = vms[vm] else { continue }
            g.bindings.forEachRun(in: 0..<UInt64.max) { r, slot in
                if let slot, v.memslots[slot]?.gmem?.file != fileID {
                    out.append(Violation(invariant: .lifetime, page: "guest_memfd file \(fileID) offset 0x\(String(r.lowerBound << 12, radix: 16))",
                        parties: ["memslot \(slot & 0xffff) of VM \(vm) (freed)"],
                        detail: "binding to a deleted memslot: kvm_gmem_release() would write to freed memory"))
                }
                return true
            }
        }
        for (pid, p) in processes {
            p.mm.vmas.forEachRun(in: 0..<UInt64.max) { run, vma in
                if let vma, case .file(let fileID, _) = vma.backing, files[fileID] == nil {
                    out.append(Violation(invariant: .lifetime, page: "VMA at 0x\(String(run.lowerBound << 12, radix: 16))",
                        parties: ["process \(pid)"], detail: "mapping of a released file"))
                }
                return true
            }
        }
        return out
    }
}

extension Kernel {
    /// The coherence (and lifetime) of one SPTE: it has a memslot, points at the page
    /// its backing holds now, and maps the side (private or shared) the gfn is on.
    func checkSPTE(vm vmID: UInt64, _ vm: VM, gfn: UInt64, _ spte: SPTE, into out: inout [Violation]) {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        func broken(_ invariant: Violation.Invariant, _ detail: String) {
            out.append(Violation(invariant: invariant, page: "gpa \(hex(gfn << 12))",
                parties: ["VM \(vmID) SPTE gfn \(hex(gfn)) -> pfn \(hex(spte.pfn))"], detail: detail))
        }
        guard let slotID = vm.slotByGfn.value(at: gfn), let slot = vm.memslots[slotID] else {
            broken(.coherence, "SPTE with no memslot")
            return
        }
        let expected: UInt64?
        if spte.isPrivate || slot.gmemOnly {
            guard let b = slot.gmem, b.fileAlive, let f = gmemFiles[b.file] else {
                broken(.lifetime, "SPTE of a memslot whose guest_memfd is gone")
                return
            }
            expected = gmemInodes[f.inode]!.folios[b.pgoff + gfn - slot.baseGfn]
        } else {
            expected = processes[vm.mmPID]?.mm.ptes[(slot.userspaceAddr >> 12) + gfn - slot.baseGfn]?.pfn
        }
        if expected != spte.pfn {
            broken(.coherence, expected.map { "the backing now holds pfn \(hex($0))" } ?? "the backing holds no page there")
        }
        if spte.isPrivate != kvmMemIsPrivate(vm: vmID, gfn: gfn) {
            broken(.coherence, "SPTE maps the \(spte.isPrivate ? "private" : "shared") side of a \(spte.isPrivate ? "shared" : "private") gfn")
        }
    }
}
