import GMemBackend
import Testing

@testable import GMemModel

/// pKVM's host/hypervisor transitions from every pair of source states: each is
/// allowed exactly from the states mem_protect.c requires, and refused with EPERM
/// (changing nothing) from all others.
struct PKVMCase: Sendable, CustomTestStringConvertible {
    var call: PKVMCall
    var host: PageState
    var hyp: PageState
    var testDescription: String { "\(call.rawValue) from host \(host.rawValue), hyp \(hyp.rawValue)" }
}

@Suite("pKVM ownership")
struct PKVMTests {
    static let hostHypCalls: [PKVMCall] = [
        .hostShareHyp, .hostUnshareHyp, .hostDonateHyp, .hypDonateHost, .hostShareFFA, .hostUnshareFFA, .hypPinSharedMem,
    ]
    /// The (host, hyp) states each call requires.
    static let allowed: [PKVMCall: [(PageState, PageState)]] = [
        .hostShareHyp: [(.owned, .noPage)],
        .hostUnshareHyp: [(.sharedOwned, .sharedBorrowed)],
        .hostDonateHyp: [(.owned, .noPage)],
        .hypDonateHost: [(.noPage, .owned)],
        .hostShareFFA: PageState.allCases.map { (.owned, $0) },
        .hostUnshareFFA: [(.sharedOwned, .noPage)],
        .hypPinSharedMem: [(.sharedOwned, .sharedBorrowed)],
    ]
    static let cases: [PKVMCase] = hostHypCalls.flatMap { c in
        PageState.allCases.flatMap { h in PageState.allCases.map { y in PKVMCase(call: c, host: h, hyp: y) } }
    }

    @Test(arguments: cases)
    func transitionsRequireExactSourceStates(_ c: PKVMCase) {
        var p = PKVM(pages: 4)
        p.host[1] = c.host
        p.hyp[1] = c.hyp
        let before = p
        let ok = Self.allowed[c.call]!.contains { $0 == (c.host, c.hyp) }
        do {
            try p.perform(c.call, PKVMArgs(page: 1))
            #expect(ok, "allowed from a state mem_protect.c refuses")
        } catch {
            #expect(!ok && error == .EPERM, "refused from an allowed state, or not with EPERM: \(error)")
            #expect(p == before, "a refused transition changed state")
        }
    }

    @Test func guestTransitionsAndTheirErrnos() throws {
        var p = PKVM(pages: 8)
        let np = p.createGuest(protected: false)
        let prot = p.createGuest(protected: true)
        #expect(throws: Errno.EINVAL) { try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: np, gfn: 0, prot: 8)) }
        #expect(throws: Errno.EINVAL) { try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: np, gfn: 0, pages: 3)) }
        #expect(throws: Errno.EPERM) { try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: prot, gfn: 0)) }
        try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: np, gfn: 0))
        #expect(throws: Errno.EPERM) { try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: np, gfn: 0)) }
        #expect(throws: Errno.ENOENT) { try p.perform(.hostUnshareGuest, PKVMArgs(page: 1, guest: np, gfn: 5)) }
        #expect(throws: Errno.E2BIG) { try p.perform(.hostUnshareGuest, PKVMArgs(page: 1, guest: np, gfn: 0, pages: 2)) }
        p.shareGuestCount[1] = UInt32.max
        #expect(throws: Errno.EBUSY) { try p.perform(.hostShareGuest, PKVMArgs(page: 1, guest: np, gfn: 1)) }
        p.shareGuestCount[1] = 1
        try p.perform(.hostUnshareGuest, PKVMArgs(page: 1, guest: np, gfn: 0))
        #expect(p.hostState(1) == .owned)
        try p.perform(.hostDonateGuest, PKVMArgs(page: 2, guest: prot, gfn: 0))
        #expect(throws: Errno.EPERM) { _ = try p.hostAccess(2, write: nil) }
        #expect(throws: Errno.EAGAIN) { try p.perform(.hostForceReclaimPageGuest, PKVMArgs(page: 3, guest: prot, gfn: 0)) }
        #expect(p.violations().isEmpty)
    }
}
