import GMemBackend

/// A guest's stage-2 entry under pKVM: the page, its state in the guest's eyes, the
/// permissions; `poisoned` after a forced reclaim.
struct PKVMGuestPTE: Hashable {
    var page: UInt64
    var state: PageState
    var prot: UInt64
    var poisoned = false
}

/// pKVM's view of physical memory: a separate world from the x86 model, with its own
/// page numbers (0..<pages), as the hypervisor's vmemmap has them.
public struct PKVM: Hashable, Sendable {
    public let pages: UInt64
    var host: [UInt64: PageState] = [:]  // default OWNED
    var hyp: [UInt64: PageState] = [:]  // default NOPAGE
    var shareGuestCount: [UInt64: UInt32] = [:]
    var hypPins: [UInt64: Int] = [:]
    var guests: [UInt64: (protected: Bool, pte: [UInt64: PKVMGuestPTE])] = [:]
    /// One byte of contents per page, to show what reclaim scrubs.
    var contents: [UInt64: UInt8] = [:]
    var nextGuest: UInt64 = 1
    /// The mutant pkvm-donate-keeps-host-access.
    var keepHostAccessOnDonate = false
    /// The mutant pkvm-reclaim-without-scrub.
    var reclaimWithoutScrub = false

    public init(pages: UInt64) { self.pages = pages }

    public static func == (a: PKVM, b: PKVM) -> Bool {
        a.pages == b.pages && a.host == b.host && a.hyp == b.hyp && a.shareGuestCount == b.shareGuestCount
            && a.hypPins == b.hypPins && a.contents == b.contents && a.guests.keys == b.guests.keys
            && a.guests.allSatisfy { k, v in b.guests[k].map { $0.protected == v.protected && $0.pte == v.pte } ?? false }
    }
    public func hash(into h: inout Hasher) {
        h.combine(pages)
        h.combine(host)
        h.combine(hyp)
        h.combine(contents)
    }

    public func hostState(_ page: UInt64) -> PageState { host[page] ?? .owned }
    public func hypState(_ page: UInt64) -> PageState { hyp[page] ?? .noPage }
    public func guestState(_ guest: UInt64, gfn: UInt64) -> PageState { guests[guest]?.pte[gfn]?.state ?? .noPage }

    /// A new guest VM; protected guests get memory by donation, others by sharing.
    public mutating func createGuest(protected: Bool) -> UInt64 {
        defer { nextGuest += 1 }
        guests[nextGuest] = (protected, [:])
        return nextGuest
    }

    /// Performs `call`, or returns the errno pKVM returns, changing nothing then.
    public mutating func perform(_ call: PKVMCall, _ a: PKVMArgs) throws(Errno) {
        if a.page >= pages { throw .EINVAL }
        let p = a.page
        switch call {
        case .hostShareHyp:
            try require(hostState(p) == .owned && hypState(p) == .noPage)
            host[p] = .sharedOwned
            hyp[p] = .sharedBorrowed
        case .hostUnshareHyp:
            try require(hostState(p) == .sharedOwned && hypState(p) == .sharedBorrowed)
            if (hypPins[p] ?? 0) > 0 { throw .EBUSY }
            host[p] = nil
            hyp[p] = nil
        case .hostDonateHyp:
            try require(hostState(p) == .owned && hypState(p) == .noPage)
            host[p] = .noPage
            hyp[p] = .owned
        case .hypDonateHost:
            try require(hypState(p) == .owned && hostState(p) == .noPage)
            host[p] = nil
            hyp[p] = nil
        case .hostShareFFA:
            try require(hostState(p) == .owned)
            host[p] = .sharedOwned
        case .hostUnshareFFA:
            try require(hostState(p) == .sharedOwned && (shareGuestCount[p] ?? 0) == 0 && hypState(p) == .noPage)
            host[p] = nil
        case .hypPinSharedMem:
            try require(hostState(p) == .sharedOwned && hypState(p) == .sharedBorrowed)
            hypPins[p, default: 0] += 1
        case .hypUnpinSharedMem:
            try require((hypPins[p] ?? 0) > 0)
            hypPins[p]! -= 1
            if hypPins[p] == 0 { hypPins[p] = nil }
        case .hostShareGuest:
            try hostShareGuest(a)
        case .hostUnshareGuest:
            try hostUnshareGuest(a)
        case .hostDonateGuest:
            let g = try guest(a)
            try require(guests[g]!.protected)
            try require(guestState(g, gfn: a.gfn) == .noPage && hostState(p) == .owned)
            if !keepHostAccessOnDonate { host[p] = .noPage }
            guests[g]!.pte[a.gfn] = PKVMGuestPTE(page: p, state: .owned, prot: 0b111)
        case .guestShareHost:
            let g = try guest(a)
            guard let pte = guests[g]!.pte[a.gfn] else { throw .ENOENT }
            if pte.poisoned { throw .EHWPOISON }
            try require(pte.state == .owned && hostState(pte.page) == .noPage)
            guests[g]!.pte[a.gfn]!.state = .sharedOwned
            host[pte.page] = .sharedBorrowed
        case .guestUnshareHost:
            let g = try guest(a)
            guard let pte = guests[g]!.pte[a.gfn] else { throw .ENOENT }
            try require(pte.state == .sharedOwned && hostState(pte.page) == .sharedBorrowed)
            guests[g]!.pte[a.gfn]!.state = .owned
            host[pte.page] = .noPage
        case .hostReclaimPageGuest:
            // After the guest is torn down: its pages come back to the host, and a page
            // the guest owned is scrubbed first so nothing it wrote leaks.
            let g = try guest(a)
            guard let pte = guests[g]!.pte[a.gfn], pte.page == p else { throw .ENOENT }
            try require(pte.state == .owned || pte.state == .sharedOwned)
            if !pte.poisoned && !reclaimWithoutScrub { contents[p] = nil }
            guests[g]!.pte[a.gfn] = nil
            host[p] = nil
        case .hostForceReclaimPageGuest:
            let g = try guest(a)
            // The host must have lost access already: otherwise the access should not fault.
            if hostState(p) != .noPage { throw .EAGAIN }
            guard let pte = guests[g]!.pte[a.gfn], pte.page == p else { throw .ENOENT }
            try require(pte.state == .owned)
            guests[g]!.pte[a.gfn]!.poisoned = true
            contents[p] = nil
            host[p] = nil
        }
    }

    private func require(_ ok: Bool) throws(Errno) {
        if !ok { throw .EPERM }
    }

    private func guest(_ a: PKVMArgs) throws(Errno) -> UInt64 {
        guard let g = a.guest, guests[g] != nil else { throw .EINVAL }
        return g
    }

    /// __pkvm_host_share_guest(): prot, then size, then the guest range, then the host
    /// page (only sharing with non-protected guests may repeat).
    private mutating func hostShareGuest(_ a: PKVMArgs) throws(Errno) {
        if a.prot & ~0b111 != 0 { throw .EINVAL }
        if a.pages != 1 && a.pages != 512 { throw .EINVAL }
        let g = try guest(a)
        try require(!guests[g]!.protected)
        try require(guestState(g, gfn: a.gfn) == .noPage)
        switch hostState(a.page) {
        case .owned: break
        case .sharedOwned:
            let count = shareGuestCount[a.page] ?? 0
            if count == UInt32.max { throw .EBUSY }
            try require(count > 0)
        default: throw .EPERM
        }
        host[a.page] = .sharedOwned
        shareGuestCount[a.page, default: 0] += 1
        guests[g]!.pte[a.gfn] = PKVMGuestPTE(page: a.page, state: .sharedBorrowed, prot: a.prot)
    }

    /// __pkvm_host_unshare_guest(): ENOENT with no guest mapping, E2BIG for a size
    /// mismatch, EPERM for the wrong states.
    private mutating func hostUnshareGuest(_ a: PKVMArgs) throws(Errno) {
        let g = try guest(a)
        guard let pte = guests[g]!.pte[a.gfn] else { throw .ENOENT }
        if a.pages != 1 { throw .E2BIG }
        try require(pte.state == .sharedBorrowed && hostState(pte.page) == .sharedOwned)
        guests[g]!.pte[a.gfn] = nil
        shareGuestCount[pte.page]! -= 1
        if shareGuestCount[pte.page] == 0 {
            shareGuestCount[pte.page] = nil
            host[pte.page] = nil
        }
    }

    // MARK: Accesses, enforced by the host's and the guests' stage-2

    /// A host access to `page`: host_stage2_idmap() refuses pages the host does not
    /// own or borrow (EPERM: an abort is injected into the host).
    public mutating func hostAccess(_ page: UInt64, write: UInt8?) throws(Errno) -> UInt8 {
        if page >= pages { throw .EINVAL }
        if hostState(page) == .noPage { throw .EPERM }
        if let write { contents[page] = write }
        return contents[page] ?? 0
    }

    /// A guest access at `gfn`: no stage-2 entry is a fault the host must resolve
    /// (ENOENT); a poisoned entry is EHWPOISON; a read-only share refuses writes (EPERM).
    public mutating func guestAccess(_ guest: UInt64, gfn: UInt64, write: UInt8?) throws(Errno) -> UInt8 {
        guard let g = guests[guest] else { throw .EINVAL }
        guard let pte = g.pte[gfn] else { throw .ENOENT }
        if pte.poisoned { throw .EHWPOISON }
        if let write {
            if pte.prot & 0b010 == 0 { throw .EPERM }
            contents[pte.page] = write
        }
        return contents[pte.page] ?? 0
    }

    /// Isolation under pKVM: a page a guest owns (not shared) is never owned or
    /// borrowed by the host or the hypervisor at the same time.
    public func violations() -> [Violation] {
        var out: [Violation] = []
        for (gid, g) in guests.sorted(by: { $0.key < $1.key }) {
            for (gfn, pte) in g.pte.sorted(by: { $0.key < $1.key }) where pte.state == .owned && !pte.poisoned {
                if hostState(pte.page) != .noPage || hypState(pte.page) != .noPage {
                    out.append(Violation(invariant: .isolation, page: "pKVM page \(pte.page)",
                        parties: ["guest \(gid) gfn \(gfn) OWNED", "host \(hostState(pte.page).rawValue)", "hyp \(hypState(pte.page).rawValue)"],
                        detail: "a page the guest owns is reachable by the host or the hypervisor"))
                }
            }
        }
        return out
    }
}
