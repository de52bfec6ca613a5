import GMemBackend

/// pin_user_pages_fast() on one page, paused between its lockless steps: the PTE it
/// read, and whether it holds the pin yet.
public struct PendingGUPFast: Hashable, Sendable {
    let pid: UInt32
    let vpn: UInt64
    let pte: PTE
    var grabbed = false
}

extension Kernel {
    /// gup_fast_pte_range(), first step: read the PTE with interrupts off and no
    /// lock. nil where GUP-fast gives up and the caller falls back to the slow path:
    /// no PTE, a write-protected one when `write` (pte_access_permitted() with
    /// FOLL_WRITE, which also catches an anonymous page fork shared copy-on-write),
    /// or a VMA outside the direct map.
    public func gupFastWalk(address: UInt64, write: Bool) -> PendingGUPFast? {
        let vpn = address >> UAPI.pageShift
        guard let pte = mm.ptes[vpn], pte.writable || !write, !isOutsideDirectMap(vpn) else { return nil }
        return PendingGUPFast(pid: currentPID, vpn: vpn, pte: pte)
    }

    /// try_grab_folio_fast(FOLL_PIN): pin the folio the PTE named, unless it was
    /// freed meanwhile (folio_try_get() fails on a zero refcount).
    public mutating func gupFastGrab(_ g: inout PendingGUPFast) -> Bool {
        guard phys.contains(g.pte.pfn) else { return false }
        phys.get(g.pte.pfn)
        phys[g.pte.pfn].pincount += 1
        g.grabbed = true
        return true
    }

    /// The recheck (`pte_val(pte) != pte_val(ptep_get(ptep))`): if the PTE changed
    /// since the walk, unpin and fail; otherwise the pin stands. Returns its id.
    public mutating func gupFastRecheck(_ g: PendingGUPFast) -> UInt64? {
        guard g.grabbed else { return nil }
        let now = processes[g.pid]?.mm.ptes[g.vpn]
        if !config.mutants.contains(.gupFastSkipRecheck) && now != g.pte {
            unpinFrame(g.pte.pfn)
            return nil
        }
        let id = newID()
        pins[id] = Pin(pfns: [g.pte.pfn], longterm: false, pid: g.pid, firstVPN: g.vpn)
        return id
    }
}
