import GMemBackend

/// What a call may do to memory contents, for the no-loss check.
public enum ContentEffect: Sendable {
    /// Changes no page's contents (bind, unbind, pin, fork, close, map, convert on a
    /// platform that preserves...).
    case preserving
    /// Stores data (host, guest, device writes): contents may change.
    case writes
    /// Documented to drop contents (punch-hole, ftruncate, memory failure).
    case destructive
}

extension Kernel {
    /// The invariants that need a before and an after:
    ///
    /// - no leak: a guest_memfd page that leaves private state on a platform whose
    ///   conversion does not preserve is zeroed; a page the host gets back from a pKVM
    ///   guest that owned it is scrubbed;
    /// - no loss: a call that preserves contents leaves every guest_memfd page that
    ///   exists before and after with the same bytes, and drops no page with data.
    ///
    /// - Complexity: O(faulted guest_memfd pages + pKVM pages).
    public static func transitionViolations(before: Kernel, after: Kernel, effect: ContentEffect) -> [Violation] {
        var out: [Violation] = []
        func page(_ ino: UInt64, _ pgoff: UInt64) -> String { "guest_memfd inode \(ino) offset 0x\(String(pgoff << 12, radix: 16))" }
        // Nothing about any page's bytes changed: only the page caches and the
        // shareability can have (the explorer's common case, checked in O(1)).
        let framesSame = before.phys.frames.isIdentical(to: after.phys.frames)
        for (ino, new) in after.gmemInodes.sorted(by: { $0.key < $1.key }) {
            guard let old = before.gmemInodes[ino] else { continue }
            if framesSame && old.folios.isIdentical(to: new.folios) && old.privatePages.isIdentical(to: new.privatePages) { continue }
            let lossy = new.files.compactMap { after.gmemFiles[$0]?.vm ?? nil }.contains { after.vms[$0]?.type.conversionIsLossy == true }
            for (pgoff, pfn) in new.folios {
                let data = after.phys.frames[pfn]?.data
                // No leak.
                if new.inPlace, old.privatePages.value(at: pgoff), !new.privatePages.value(at: pgoff), lossy,
                    data?.contains(where: { $0 != 0 }) == true
                {
                    out.append(Violation(invariant: .noLeak, page: page(ino, pgoff), parties: ["host (now shared)"],
                        detail: "private contents became visible to the host on a platform that does not preserve them"))
                }
                // No loss.
                if effect == .preserving, let oldPFN = old.folios[pgoff], !(lossy && old.privatePages.value(at: pgoff) != new.privatePages.value(at: pgoff)) {
                    let oldFrame = before.phys.frames[oldPFN]
                    // The same frame with the same bytes (digests first: O(1) unless equal).
                    if oldPFN == pfn, let f = oldFrame, let g = after.phys.frames[pfn], f.sameBytes(as: g) { continue }
                    if oldFrame?.data != data && !(oldFrame?.data == nil && data?.allSatisfy({ $0 == 0 }) == true) {
                        out.append(Violation(invariant: .noLoss, page: page(ino, pgoff), parties: ["guest_memfd"],
                            detail: "a call that preserves contents changed them"))
                    }
                }
            }
            if effect == .preserving {
                for (pgoff, oldPFN) in old.folios where new.folios[pgoff] == nil {
                    if before.phys.frames[oldPFN]?.data?.contains(where: { $0 != 0 }) == true {
                        out.append(Violation(invariant: .noLoss, page: page(ino, pgoff),
                            parties: ["guest_memfd"], detail: "a call that preserves contents dropped a page holding data"))
                    }
                }
            }
        }
        // No leak under pKVM: what a guest owned comes back to the host scrubbed.
        for page in 0..<after.pkvm.pages where before.pkvm.hostState(page) == .noPage && after.pkvm.hostState(page) == .owned {
            let wasGuests = before.pkvm.guests.values.contains { g in g.pte.values.contains { $0.page == page && $0.state == .owned } }
            if wasGuests, (after.pkvm.contents[page] ?? 0) != 0 {
                out.append(Violation(invariant: .noLeak, page: "pKVM page \(page)", parties: ["host"],
                    detail: "a page a guest owned came back to the host unscrubbed"))
            }
        }
        return out
    }
}
