import GMemBackend
import PropertyBased
import Testing

@testable import GMemModel

@testable import GMemVMM

/// Records what it is told, checks at each call what the host can reach, and can be
/// told to refuse.
final class RecordingListener: ConversionListener {
    let name: String
    let backend: ModelBackend
    let map: Mapping
    let base: UInt64
    var events: [String] = []
    /// Pages (by gpa) this listener currently has mapped.
    var mapped: Set<UInt64> = []
    var vetoMap: ((UInt64) -> Bool)?
    var vetoUnmap: ((UInt64) -> Bool)?

    init(_ name: String, backend: ModelBackend, map: Mapping, base: UInt64) {
        self.name = name
        self.backend = backend
        self.map = map
        self.base = base
    }

    func hostCanReach(_ gpa: UInt64) -> Bool {
        (try? backend.hostRead(address: map.address + gpa - base, count: 1)).map { if case .completed = $0 { true } else { false } } ?? false
    }

    func willMakePrivate(gpa: UInt64, size: UInt64) throws(ConversionError) {
        if vetoUnmap?(gpa) == true { throw ConversionError(errno: .EBUSY, gpa: gpa, stage: .listener, who: name) }
        events.append("unmap 0x\(String(gpa, radix: 16))+\(size / 4096)\(hostCanReach(gpa) ? "" : " (already private!)")")
        for p in stride(from: gpa, to: gpa + size, by: 4096) { mapped.remove(p) }
    }

    func didMakeShared(gpa: UInt64, size: UInt64) throws(ConversionError) {
        if vetoMap?(gpa) == true { throw ConversionError(errno: .ENOSPC, gpa: gpa, stage: .listener, who: name) }
        events.append("map 0x\(String(gpa, radix: 16))+\(size / 4096)\(hostCanReach(gpa) ? "" : " (not shared yet!)")")
        for p in stride(from: gpa, to: gpa + size, by: 4096) { mapped.insert(p) }
    }
}

@Suite("Conversion manager")
struct ConversionManagerTests {
    static let base: UInt64 = 1 << 30
    static let pages: UInt64 = 16

    /// An in-place VM with 16 private pages at 1 GiB, a host mapping, and a manager.
    static func inPlace() throws -> (ModelBackend, ConversionManager, Mapping, FD) {
        let b = ModelBackend(checkTransitions: true)
        let vm = try b.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try b.createGuestMemfd(on: vm, size: pages * 4096, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try b.mmap(fd: gmem, offset: 0, length: pages * 4096, prot: [.read, .write], shared: true)
        try b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: base, memorySize: pages * 4096, userspaceAddr: 0,
            guestMemfd: UInt32(gmem.raw)))
        let m = ConversionManager(backend: b, vm: vm, policy: .inPlace, regions: [ManagedRegion(gpa: base, size: pages * 4096, gmem: gmem)])
        return (b, m, map, gmem)
    }

    @Test func listenersUnmapBeforePrivateAndMapAfterShared() throws {
        let (b, m, map, _) = try Self.inPlace()
        let l = RecordingListener("vfio", backend: b, map: map, base: Self.base)
        try m.register(l)
        try m.convert(gpa: Self.base, size: 4 * 4096, toPrivate: false)
        try m.convert(gpa: Self.base + 4096, size: 4096, toPrivate: true)
        #expect(l.events == ["map 0x40000000+4", "unmap 0x40001000+1"], "no '(not shared yet!)' or '(already private!)'")
        #expect(!m.isPrivate(gpa: Self.base) && m.isPrivate(gpa: Self.base + 4096))
        #expect(try b.checkInvariants().isEmpty)
    }

    /// A real VFIO listener maps page by page, so the VMM can give back any one page
    /// of a shared range: VFIO type1 refuses an unmap that splits a mapping.
    @Test(arguments: [4096, 16384] as [UInt64])
    func theVFIOListenerCanGiveBackOnePage(granularity: UInt64) throws {
        let (b, m, map, _) = try Self.inPlace()
        let domain = try b.createIOMMUDomain(.vfio, vm: nil)
        try m.register(IOMMUListener(name: "vfio", backend: b, domain: domain, hostAddress: map.address, gpaBase: Self.base,
                                     granularity: granularity))
        try m.convert(gpa: Self.base, size: 4 * 4096, toPrivate: false)
        #expect(try b.dma(domain: domain, iova: Self.base + 4096, write: nil, count: 1) == [0])
        if granularity == 4096 {
            try m.convert(gpa: Self.base + 4096, size: 4096, toPrivate: true)
            #expect(throws: BackendError.errno(.EFAULT)) { try b.dma(domain: domain, iova: Self.base + 4096, write: nil, count: 1) }
            #expect(try b.dma(domain: domain, iova: Self.base + 8192, write: nil, count: 1) == [0], "the rest stays mapped")
        } else {
            // One 16K mapping cannot give back one page: VFIO refuses the split.
            #expect(throws: ConversionError.self) { try m.convert(gpa: Self.base + 4096, size: 4096, toPrivate: true) }
            #expect(!m.isPrivate(gpa: Self.base + 4096), "refused whole")
        }
        #expect(try b.checkInvariants().isEmpty)
    }

    @Test func aVetoRollsBackEveryStepAlreadyTaken() throws {
        let (b, m, map, _) = try Self.inPlace()
        let first = RecordingListener("first", backend: b, map: map, base: Self.base)
        let second = RecordingListener("second", backend: b, map: map, base: Self.base)
        second.vetoMap = { _ in true }
        try m.register(first)
        try m.register(second)
        #expect(throws: ConversionError(errno: .ENOSPC, gpa: Self.base, stage: .listener, who: "second")) {
            try m.convert(gpa: Self.base, size: 2 * 4096, toPrivate: false)
        }
        #expect(first.events == ["map 0x40000000+2", "unmap 0x40000000+2"], "the listener that mapped is told to unmap")
        #expect(first.mapped.isEmpty)
        #expect(m.isPrivate(gpa: Self.base), "the manager's state is unchanged")
        #expect(!first.hostCanReach(Self.base), "and so is the kernel's: the pages are private again")
        #expect(try b.checkInvariants().isEmpty)
    }

    @Test func aRefusedConversionNamesTheBusyPageAndRemapsListeners() throws {
        let (b, m, map, _) = try Self.inPlace()
        let l = RecordingListener("vfio", backend: b, map: map, base: Self.base)
        try m.register(l)
        try m.convert(gpa: Self.base, size: 8 * 4096, toPrivate: false)
        let pin = try b.pin(address: map.address + 5 * 4096, length: 4096, longterm: true)
        #expect(throws: ConversionError(errno: .EAGAIN, gpa: Self.base + 5 * 4096, stage: .kernel, who: "guest_memfd")) {
            try m.convert(gpa: Self.base, size: 8 * 4096, toPrivate: true)
        }
        #expect(l.events.suffix(2) == ["unmap 0x40000000+8", "map 0x40000000+8"], "unmapped first, remapped on rollback")
        #expect(l.mapped.count == 8 && !m.isPrivate(gpa: Self.base))
        try b.unpin(pin)
        try m.convert(gpa: Self.base, size: 8 * 4096, toPrivate: true)
        #expect(m.isPrivate(gpa: Self.base + 5 * 4096))
    }

    @Test func preFaultingMapsTheConvertedRangeAheadOfTheGuest() throws {
        let (b, m, _, _) = try Self.inPlace()
        let vm = m.vm
        m.prefaultVCPU = try b.createVCPU(vm: vm, id: 0)
        let id = try b.kernel.vmFD(vm.raw)
        #expect(b.kernel.vms[id]!.spte.isEmpty)
        try m.convert(gpa: Self.base, size: 4 * 4096, toPrivate: false)
        #expect(b.kernel.vms[id]!.spte.count == 4, "the four converted pages are mapped before the guest touches them")
        #expect(b.kernel.vms[id]!.spte.values.allSatisfy { !$0.isPrivate })
    }

    @Test func aLateListenerGetsTheSharedRangesReplayed() throws {
        let (b, m, map, _) = try Self.inPlace()
        try m.convert(gpa: Self.base, size: 3 * 4096, toPrivate: false)
        try m.convert(gpa: Self.base + 8 * 4096, size: 2 * 4096, toPrivate: false)
        try m.convert(gpa: Self.base + 3 * 4096, size: 4096, toPrivate: false)  // coalesces with the first
        let late = RecordingListener("late", backend: b, map: map, base: Self.base)
        try m.register(late)
        #expect(late.events == ["map 0x40000000+4", "map 0x40008000+2"])
    }

    @Test func requestsAreValidatedAndUnmanagedSharedRangesIgnored() throws {
        let (_, m, _, _) = try Self.inPlace()
        #expect(throws: ConversionError.self) { try m.convert(gpa: Self.base + 1, size: 4096, toPrivate: false) }
        #expect(throws: ConversionError.self) { try m.convert(gpa: Self.base, size: 0, toPrivate: false) }
        #expect(throws: ConversionError(errno: .EINVAL, gpa: Self.base + Self.pages * 4096, stage: .validation, who: "no region")) {
            try m.convert(gpa: Self.base, size: (Self.pages + 1) * 4096, toPrivate: true)
        }
        // Firmware converts MMIO ranges to shared: accepted, nothing to do.
        try m.convert(gpa: 0xfee0_0000, size: 4096, toPrivate: false)
    }

    @Test func theAttributeModelDiscardsTheStaleSide() throws {
        let b = ModelBackend(checkTransitions: true)
        let vm = try b.createVM(type: VMType.swProtected.number)
        let size = Self.pages * 4096
        let backing = try b.memfdCreate(size: size)
        let hva = try b.mmap(fd: backing, offset: 0, length: size, prot: [.read, .write], shared: true)
        let gmem = try b.createGuestMemfd(on: vm, size: size, flags: 0)
        try b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: Self.base, memorySize: size, userspaceAddr: hva.address,
            guestMemfd: UInt32(gmem.raw)))
        let m = ConversionManager(backend: b, vm: vm, policy: .attributes,
                                  regions: [ManagedRegion(gpa: Self.base, size: size, gmem: gmem, sharedBacking: backing)],
                                  initiallyPrivate: false)
        let vcpu = try b.createVCPU(vm: vm, id: 0)
        _ = try b.hostWrite(address: hva.address, bytes: [0x5a])
        try m.convert(gpa: Self.base, size: 4096, toPrivate: true)
        #expect(try b.hostRead(address: hva.address, count: 1) == .completed([0]), "to-private discarded the shared copy")
        _ = try b.guestAccess(vcpu: vcpu, GuestAccess(gpa: Self.base, kind: .write([0x77])))
        try m.convert(gpa: Self.base, size: 4096, toPrivate: false)
        try m.convert(gpa: Self.base, size: 4096, toPrivate: true)
        #expect(try b.guestAccess(vcpu: vcpu, GuestAccess(gpa: Self.base, kind: .read(count: 1))) == .completed([0]),
                "to-shared discarded the private copy: the round trip is lossy")
        #expect(try b.checkInvariants().isEmpty)
    }

    /// Whatever listeners refuse, the manager's view, the kernel's and every
    /// listener's mappings agree after each request.
    @Test func stateStaysConsistentUnderRandomRequestsAndVetoes() async {
        let request = PropertyBased.zip(Gen.int(in: 0...15), Gen.int(in: 1...16), Gen.bool, Gen.int(in: 0...4))
        await propertyCheck(count: 100, input: request.array(of: 1...25)) { requests in
            guard let (b, m, map, _) = try? Self.inPlace() else { return }
            let a = RecordingListener("a", backend: b, map: map, base: Self.base)
            let v = RecordingListener("vetoer", backend: b, map: map, base: Self.base)
            var vetoPage: UInt64 = UInt64.max
            v.vetoMap = { $0 <= vetoPage && vetoPage < $0 + 16 * 4096 && vetoPage != UInt64.max }
            try? m.register(a)
            try? m.register(v)
            for (start, count, toPrivate, veto) in requests {
                let n = min(count, 16 - start)
                vetoPage = veto == 0 ? Self.base + UInt64(start) * 4096 : UInt64.max
                _ = try? m.convert(gpa: Self.base + UInt64(start) * 4096, size: UInt64(n) * 4096, toPrivate: toPrivate)
                for p in 0..<Self.pages {
                    let gpa = Self.base + p * 4096
                    let shared = !m.isPrivate(gpa: gpa)
                    #expect(a.hostCanReach(gpa) == shared, "kernel and manager disagree at page \(p)")
                    #expect(a.mapped.contains(gpa) == shared && v.mapped.contains(gpa) == shared, "a listener is out of step at page \(p)")
                }
                #expect((try? b.checkInvariants())?.isEmpty == true)
            }
        }
    }

    /// A hostile guest: floods of requests with misaligned, zero, wrapping, oversized
    /// and out-of-range arguments, interleaved with its own stores and loads on the
    /// pages it is converting. The VMM answers every request as KVM would validate it,
    /// the program always runs to its end, the manager agrees with a reference model
    /// of which pages are private, the guest's bytes survive (sw_protected in-place
    /// conversion keeps them), and every invariant holds.
    @Test func aHostileGuestGetsErrorsAndNeverStopsTheVMM() async {
        let gpas: [UInt64] = [0, 1, 4095, 4096, 8 * 4096, 15 * 4096, 16 * 4096, 1 << 29, UInt64.max & ~4095]
        let counts: [UInt64] = [0, 1, 2, 16, 17, (1 << 18) + 1, 1 << 52, 1 << 62, UInt64.max]
        enum Step { case convert(gpa: UInt64, npages: UInt64, toPrivate: Bool), fill(page: UInt64, byte: UInt8), verify(page: UInt64) }
        let step = PropertyBased.zip(Gen.int(in: 0...2), Gen.int(in: 0...8), Gen.int(in: 0...8), Gen.bool, Gen.int(in: 0...15), Gen.int(in: 1...255))
            .map { kind, g, c, toPrivate, page, byte -> Step in
                switch kind {
                case 0: .convert(gpa: Self.base &+ gpas[g] &- (g >= 7 ? Self.base : 0), npages: counts[c], toPrivate: toPrivate)
                case 1: .fill(page: UInt64(page), byte: UInt8(byte))
                default: .verify(page: UInt64(page))
                }
            }
        await propertyCheck(count: 60, input: step.array(of: 1...60)) { steps in
            guard let (b, m, _, _) = try? Self.inPlace(), let vcpu = try? b.createVCPU(vm: m.vm, id: 0) else {
                Issue.record("setup failed")
                return
            }
            let handler = GuestRequestHandler(manager: m)
            var isPrivate = [Bool](repeating: true, count: Int(Self.pages))
            var bytes = [UInt8](repeating: 0, count: Int(Self.pages))
            var ops: [GuestProgram.Op] = []
            var expected: [UInt64?] = []
            for s in steps {
                switch s {
                case .convert(let gpa, let npages, let toPrivate):
                    ops.append(.convert(ConversionRequest(gpa: gpa, npages: npages, toPrivate: toPrivate, channel: .doorbell)))
                    let (size, o1) = npages.multipliedReportingOverflow(by: 4096)
                    let (end, o2) = gpa.addingReportingOverflow(size)
                    let answer: Errno?
                    if gpa % 4096 != 0 || npages == 0 || o1 || o2 { answer = .EINVAL }
                    else if npages > 1 << 18 { answer = .E2BIG }
                    else if toPrivate && (gpa < Self.base || end > Self.base + Self.pages * 4096) { answer = .EINVAL }
                    else {
                        answer = nil
                        let lo = max(gpa, Self.base), hi = min(end, Self.base + Self.pages * 4096)
                        if lo < hi { for p in (lo - Self.base) / 4096..<(hi - Self.base) / 4096 { isPrivate[Int(p)] = toPrivate } }
                    }
                    expected.append(answer.map { UInt64(UInt32(truncatingIfNeeded: GuestRequestHandler.code($0))) } ?? 0)
                case .fill(let page, let byte):
                    ops.append(.fill(gpa: Self.base + page * 4096, length: 4096, pattern: [byte]))
                    bytes[Int(page)] = byte
                case .verify(let page):
                    ops.append(.verify(gpa: Self.base + page * 4096, length: 4096, pattern: [bytes[Int(page)]]))
                    expected.append(nil)
                }
            }
            guard let result = try? b.runGuestProgram(vcpu: vcpu, GuestProgram(ops), handler: handler.handle) else {
                Issue.record("the program could not run")
                return
            }
            #expect(result.end == .completed([]), "the guest was stopped: \(result.end)")
            #expect(result.events.count == expected.count)
            for (event, want) in zip(result.events, expected) {
                switch event {
                case .conversion(let r, let got):
                    #expect(got == want, "gpa 0x\(String(r.gpa, radix: 16)) npages \(r.npages): answered 0x\(String(got, radix: 16))")
                case .verified(let gpa, _, let at):
                    #expect(at == nil, "the guest's bytes changed at gpa 0x\(String(gpa, radix: 16))")
                default: Issue.record("unexpected event \(event)")
                }
            }
            for p in 0..<Int(Self.pages) { #expect(m.isPrivate(gpa: Self.base + UInt64(p) * 4096) == isPrivate[p], "page \(p)") }
            #expect((try? b.checkInvariants())?.isEmpty == true)
        }
    }
}
