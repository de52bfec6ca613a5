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
    /// - Complexity: O((changed frames + changed page-cache entries) x log n + pKVM
    ///   pages) when shareability did not change; O(faulted guest_memfd pages) for an
    ///   inode whose shareability did.
    /// Below `diffAbove` frames, walking every page is cheaper than finding what
    /// changed, and is what runs.
    public static func transitionViolations(before: Kernel, after: Kernel, effect: ContentEffect, diffAbove: Int = 1024) -> [Violation] {
        var out: [Violation] = []
        let diff = after.phys.frames.count > diffAbove
        func page(_ ino: UInt64, _ pgoff: UInt64) -> String { "guest_memfd inode \(ino) offset 0x\(String(pgoff << 12, radix: 16))" }
        // The frames whose bytes or counts changed, by the page-cache entry they
        // were allocated for: only those pages, and pages whose entry changed, can
        // have lost or leaked anything (unless shareability changed).
        var touched: [UInt64: Set<UInt64>] = [:]
        for pfn in diff ? after.phys.frames.changedKeys(from: before.phys.frames) : [] {
            if let o = (after.phys.frames[pfn] ?? before.phys.frames[pfn])?.gmemOwner { touched[o.inode, default: []].insert(o.pgoff) }
        }
        for (ino, new) in after.gmemInodes.sorted(by: { $0.key < $1.key }) {
            guard let old = before.gmemInodes[ino] else { continue }
            let pgoffs: [UInt64]
            if diff && old.privatePages.isIdentical(to: new.privatePages) {
                pgoffs = Set(new.folios.changedKeys(from: old.folios)).union(touched[ino] ?? []).sorted()
            } else {
                pgoffs = Set(new.folios.keys).union(old.folios.keys).sorted()
            }
            guard !pgoffs.isEmpty else { continue }
            let lossy = new.files.compactMap { after.gmemFiles[$0]?.vm ?? nil }.contains { after.vms[$0]?.type.conversionIsLossy == true }
            for pgoff in pgoffs {
                guard let pfn = new.folios[pgoff] else { continue }
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
                for pgoff in pgoffs where new.folios[pgoff] == nil {
                    if let oldPFN = old.folios[pgoff], before.phys.frames[oldPFN]?.data?.contains(where: { $0 != 0 }) == true {
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
