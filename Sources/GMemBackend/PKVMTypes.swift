/// pKVM's ownership vocabulary (arm64 hyp/nvhe/mem_protect.c), shared by the protocol
/// and the model.

/// A pKVM page state, as one component sees a page (arch/arm64/kvm/hyp/include/nvhe/memory.h).
public enum PageState: String, CaseIterable, Hashable, Sendable {
    case owned = "OWNED"
    case sharedOwned = "SHARED_OWNED"
    case sharedBorrowed = "SHARED_BORROWED"
    case noPage = "NOPAGE"
}

/// The calls of pKVM's ownership state machine (mem_protect.c).
public enum PKVMCall: String, CaseIterable, Hashable, Sendable {
    case hostShareHyp = "host_share_hyp"
    case hostUnshareHyp = "host_unshare_hyp"
    case hostDonateHyp = "host_donate_hyp"
    case hypDonateHost = "hyp_donate_host"
    case hostShareFFA = "host_share_ffa"
    case hostUnshareFFA = "host_unshare_ffa"
    case hypPinSharedMem = "hyp_pin_shared_mem"
    case hypUnpinSharedMem = "hyp_unpin_shared_mem"
    case hostShareGuest = "host_share_guest"
    case hostUnshareGuest = "host_unshare_guest"
    case hostDonateGuest = "host_donate_guest"
    case guestShareHost = "guest_share_host"
    case guestUnshareHost = "guest_unshare_host"
    case hostReclaimPageGuest = "host_reclaim_page_guest"
    case hostForceReclaimPageGuest = "host_force_reclaim_page_guest"
}

/// Arguments of one pKVM call; which fields matter depends on the call.
public struct PKVMArgs: Hashable, Sendable {
    public var page: UInt64
    public var guest: UInt64?
    public var gfn: UInt64
    public var pages: UInt64
    public var prot: UInt64
    public init(page: UInt64 = 0, guest: UInt64? = nil, gfn: UInt64 = 0, pages: UInt64 = 1, prot: UInt64 = 0b111) {
        self.page = page
        self.guest = guest
        self.gfn = gfn
        self.pages = pages
        self.prot = prot
    }
}

