import GMemBackend

extension Kernel {
    /// `checkSystemInvariants()` for a state one step away from `parent`, which held
    /// every invariant: the same answer, found by looking only at what the step
    /// changed when that is safe.
    ///
    /// The shortcut applies when the step changed nothing but page-table entries
    /// (SPTEs, PTEs), page-cache entries, frames and what no invariant reads (a
    /// page's allocation state, mmu_invalidate_seq): everything else (memslots,
    /// attributes, shareability, files, VMAs, pins, IOMMUs, pKVM) must be as in
    /// `parent`, or the whole check runs. Then a violation can only sit
    /// on a changed entry, or on an SPTE whose backing (a page-cache entry or a PTE)
    /// changed, or in the pins and IOMMU entries (checked whole: they are few). New
    /// page-cache entries must name frames allocated by this step, which nothing
    /// older can map. Whenever the shortcut finds anything at all, the whole check
    /// runs and gives the report, so the report is always the full one.
    ///
    /// - Complexity: O(changed entries x log n + pinned pages + IOMMU entries) on
    ///   the shortcut; O(checkSystemInvariants()) otherwise.
    public func checkSystemInvariants(since parent: Kernel) -> [Violation] {
        guard sameOutsidePages(as: parent) else { return checkSystemInvariants() }
        var suspicious = false
        var recheck: [UInt64: Set<UInt64>] = [:]  // VM -> gfns whose SPTE to check

        // Changed SPTEs: coherence, and isolation from VMs that do not own the page.
        for (vmID, vm) in vms {
            for gfn in vm.spte.changedKeys(from: parent.vms[vmID]!.spte) where vm.spte[gfn] != nil {
                recheck[vmID, default: []].insert(gfn)
                if let page = privateGmemPage(vm.spte[gfn]!.pfn),
                    !gmemInodes[page.inode]!.files.contains(where: { gmemFiles[$0]?.vm == vmID })
                {
                    suspicious = true
                }
            }
        }
        // Changed PTEs: isolation, and the SPTEs of shared memory they back.
        for (pid, p) in processes {
            let changed = p.mm.ptes.changedKeys(from: parent.processes[pid]!.mm.ptes)
            guard !changed.isEmpty else { continue }
            for vpn in changed {
                if let pte = p.mm.ptes[vpn], privateGmemPage(pte.pfn) != nil { suspicious = true }
            }
            for (vmID, vm) in vms where vm.mmPID == pid {
                for slot in vm.memslots.values where !slot.gmemOnly {
                    let first = slot.userspaceAddr >> UAPI.pageShift
                    for vpn in changed where vpn >= first && vpn - first < slot.npages {
                        recheck[vmID, default: []].insert(slot.baseGfn + vpn - first)
                    }
                }
            }
        }
        // Changed page-cache entries: the SPTEs they back. A new entry must be a
        // frame this step allocated.
        for (ino, inode) in gmemInodes {
            let changed = inode.folios.changedKeys(from: parent.gmemInodes[ino]!.folios)
            guard !changed.isEmpty else { continue }
            for pgoff in changed {
                if let pfn = inode.folios[pgoff], parent.phys.contains(pfn), parent.gmemInodes[ino]!.folios[pgoff] != pfn {
                    return checkSystemInvariants()
                }
            }
            for (vmID, vm) in vms {
                for slot in vm.memslots.values {
                    guard let b = slot.gmem, let f = gmemFiles[b.file], f.inode == ino else { continue }
                    for pgoff in changed where pgoff >= b.pgoff && pgoff - b.pgoff < slot.npages {
                        recheck[vmID, default: []].insert(slot.baseGfn + pgoff - b.pgoff)
                    }
                }
            }
        }
        var out: [Violation] = []
        for (vmID, gfns) in recheck {
            let vm = vms[vmID]!
            for gfn in gfns {
                if let spte = vm.spte[gfn] { checkSPTE(vm: vmID, vm, gfn: gfn, spte, into: &out) }
            }
        }
        if suspicious || !out.isEmpty || pinsOrIOMMUsLookBroken() { return checkSystemInvariants() }
        return []
    }

    /// The guest_memfd page `pfn` holds, if it is in a page cache now and private.
    func privateGmemPage(_ pfn: UInt64) -> GmemPageRef? {
        guard let o = phys.frames[pfn]?.gmemOwner, let inode = gmemInodes[o.inode],
            inode.folios[o.pgoff] == pfn, !inode.isShared(o.pgoff)
        else { return nil }
        return o
    }

    /// Whether the two kernels differ at most in page-table entries, page-cache
    /// entries, frames, and state no invariant reads (a page's allocation state,
    /// mmu_invalidate_seq, bookkeeping).
    ///
    /// - Complexity: O(objects), with O(1) for each range map a step left alone.
    func sameOutsidePages(as other: Kernel) -> Bool {
        func strip(_ k: Kernel) -> Kernel {
            var s = k
            s.phys = PhysicalMemory()
            for id in s.vms.keys {
                s.vms[id]!.spte = PageMap()
                s.vms[id]!.mmuInvalidateSeq = 0
            }
            for ino in s.gmemInodes.keys {
                s.gmemInodes[ino]!.folios = PageMap()
                s.gmemInodes[ino]!.state = RangeMap(.hole)
            }
            for pid in s.processes.keys { s.processes[pid]!.mm.ptes = PageMap() }
            return s
        }
        return strip(self) == strip(other)
    }

    /// Whether a pin or an IOMMU entry reaches a private page or no longer matches
    /// what it should (the whole check says which). Pins and IOMMU entries are few.
    func pinsOrIOMMUsLookBroken() -> Bool {
        for (_, pin) in pins {
            for (i, pfn) in pin.pfns.enumerated() {
                if privateGmemPage(pfn) != nil { return true }
                if let pte = processes[pin.pid]?.mm.ptes[pin.firstVPN + UInt64(i)], pte.pfn != pfn { return true }
            }
        }
        for (_, d) in iommuDomains {
            for (vpn, e) in d.entries {
                if privateGmemPage(e.pfn) != nil { return true }
                if let g = e.gmemPage, gmemInodes[g.inode]?.folios[g.pgoff] != e.pfn { return true }
                if d.model == .sva, d.pid.flatMap({ processes[$0]?.mm.ptes[vpn]?.pfn }) != e.pfn { return true }
            }
        }
        return false
    }
}
