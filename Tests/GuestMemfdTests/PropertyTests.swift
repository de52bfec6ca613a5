import GMemBackend
import PropertyBased
import Testing

@testable import GMemModel

/// A per-page reference for memslots, bindings and attributes: arrays, no ranges,
/// no cleverness. The model must agree with it after every operation.
struct ReferenceVM {
    static let gfns = 64
    static let filePages = 48
    var attrPrivate = [Bool](repeating: false, count: gfns)
    var slotAt = [UInt32?](repeating: nil, count: gfns)
    var boundBy = [UInt32?](repeating: nil, count: filePages)
    var slots: [UInt32: (base: Int, npages: Int, pgoff: Int)] = [:]

    /// What KVM_SET_USER_MEMORY_REGION2 with GUEST_MEMFD must return.
    mutating func setRegion(slot: UInt32, base: Int, npages: Int, pgoff: Int) -> Errno? {
        if npages == 0 {
            guard let old = slots.removeValue(forKey: slot) else { return .EINVAL }
            for g in old.base..<old.base + old.npages { slotAt[g] = nil }
            for p in old.pgoff..<old.pgoff + old.npages { boundBy[p] = nil }
            return nil
        }
        if slots[slot] != nil { return .EINVAL }  // guest_memfd slots are immutable
        if (base..<base + npages).contains(where: { slotAt[$0] != nil }) { return .EEXIST }
        if pgoff + npages > Self.filePages { return .EINVAL }
        if (pgoff..<pgoff + npages).contains(where: { boundBy[$0] != nil }) { return .EINVAL }
        slots[slot] = (base, npages, pgoff)
        for g in base..<base + npages { slotAt[g] = slot }
        for p in pgoff..<pgoff + npages { boundBy[p] = slot }
        return nil
    }

    mutating func setAttributes(lo: Int, hi: Int, isPrivate: Bool) -> Errno? {
        if hi <= lo { return .EINVAL }
        for g in lo..<hi { attrPrivate[g] = isPrivate }
        return nil
    }

    /// What a one-byte guest read at `gfn` must end in. Shared faults go through
    /// userspace_addr 0, where nothing is mapped.
    func guestRead(gfn: Int) -> String {
        switch (attrPrivate[gfn], slotAt[gfn] != nil) {
        case (true, true): "ok"
        case (true, false): "EFAULT private"
        case (false, true): "EFAULT shared"
        case (false, false): "mmio"
        }
    }
}

enum RefOp: Sendable, CustomStringConvertible {
    case bind(slot: UInt32, base: Int, npages: Int, pgoff: Int)
    case attrs(lo: Int, hi: Int, isPrivate: Bool)
    case read(gfn: Int)

    var description: String {
        switch self {
        case .bind(let s, let b, let n, let p): "bind(slot \(s), gfn \(b), \(n) pages, pgoff \(p))"
        case .attrs(let lo, let hi, let p): "attrs(\(lo)..<\(hi), \(p ? "private" : "shared"))"
        case .read(let g): "read(gfn \(g))"
        }
    }
}

@Suite("Properties")
struct PropertyTests {
    static let refOp = PropertyBased.zip(
        Gen.int(in: 0...2), Gen.int(in: 0...63), Gen.int(in: 0...64), Gen.int(in: 0...8), Gen.int(in: 0...47)
    ).map { kind, a, b, n, p -> RefOp in
        switch kind {
        case 0: .bind(slot: UInt32(n % 4), base: a, npages: n, pgoff: p)
        case 1: .attrs(lo: a, hi: b, isPrivate: p % 2 == 0)
        default: .read(gfn: a)
        }
    }

    @Test func bindingsAttributesAndFaultsMatchAPerPageReference() async {
        await propertyCheck(count: 200, input: Self.refOp.array(of: 1...40)) { ops in
            var k = Kernel()
            var ref = ReferenceVM()
            guard let (vmFD, gmem) = try? k.vmWithGmem(type: .swProtected, size: UInt64(ReferenceVM.filePages) * 4096),
                let vm = try? k.vmFD(vmFD), let vcpu = try? k.createVCPU(vm: vmFD, id: 0)
            else {
                Issue.record("setup failed")
                return
            }
            let fileID = k.fds[gmem]!
            for op in ops {
                switch op {
                case .bind(let slot, let base, var npages, let pgoff):
                    npages = min(npages, ReferenceVM.gfns - base)
                    let region = UserMemoryRegion2(
                        slot: slot, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: UInt64(base) << 12,
                        memorySize: UInt64(npages) << 12, userspaceAddr: 0, guestMemfdOffset: UInt64(pgoff) << 12,
                        guestMemfd: UInt32(gmem))
                    let got = errnoOf { () throws(Errno) in try k.setUserMemoryRegion2(vm: vmFD, region) }
                    #expect(got == ref.setRegion(slot: slot, base: base, npages: npages, pgoff: pgoff), "\(op)")
                case .attrs(let lo, let hi, let isPrivate):
                    let size = hi > lo ? UInt64(hi - lo) << 12 : 0
                    let got = errnoOf { () throws(Errno) in
                        try k.setMemoryAttributes(vm: vmFD, address: UInt64(lo) << 12, size: size,
                                                  attributes: isPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0)
                    }
                    #expect(got == ref.setAttributes(lo: lo, hi: hi, isPrivate: isPrivate), "\(op)")
                case .read(let gfn):
                    let outcome = try? k.guestAccess(vcpu: vcpu, GuestAccess(gpa: UInt64(gfn) << 12, kind: .read(count: 1)))
                    let got: String
                    switch outcome {
                    case .completed?: got = "ok"
                    case .exit(.mmio)?: got = "mmio"
                    case .failed(.EFAULT, .memoryFault(let flags, _, _)?)? where flags & UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE != 0:
                        got = "EFAULT private"
                    case .failed(.EFAULT, nil)?:
                        // GUP on userspace_addr failed: EFAULT without a memory-fault exit.
                        got = "EFAULT shared"
                    default: got = "\(String(describing: outcome))"
                    }
                    #expect(got == ref.guestRead(gfn: gfn), "\(op)")
                }
                for g in 0..<ReferenceVM.gfns {
                    #expect(k.vms[vm]!.slotByGfn.value(at: UInt64(g)) == ref.slotAt[g])
                    #expect(k.vms[vm]!.isPrivate(gfn: UInt64(g)) == ref.attrPrivate[g])
                }
                for p in 0..<ReferenceVM.filePages {
                    #expect(k.gmemFiles[fileID]!.bindings.value(at: UInt64(p)) == ref.boundBy[p])
                }
                // Every stage-2 entry must be one the current state would produce.
                for (gfn, spte) in k.vms[vm]!.spte {
                    #expect(spte.isPrivate == ref.attrPrivate[Int(gfn)], "stale SPTE at gfn \(gfn) after \(op)")
                    #expect(ref.slotAt[Int(gfn)] != nil, "SPTE without a memslot at gfn \(gfn) after \(op)")
                }
                k.checkInvariants()
            }
        }
    }

    /// Arguments chosen to hit edges: zero, unaligned, page-aligned, huge, wrapping.
    static let edges: [UInt64] = [
        0, 1, 4095, 4096, 8192, 12288, 1 << 21, (1 << 21) + 4096, 1 << 30, 1 << 32, 1 << 47, 1 << 52, 1 << 63,
        UInt64.max, 0 &- 4096,
    ]
    static let number = Gen.int(in: 0...14).map { edges[$0] }

    @Test func noSequenceOfCallsTrapsOrBreaksTheModel() async {
        let call = PropertyBased.zip(Gen.int(in: 0...32), Gen.int(in: -1...12), Self.number, Self.number, Gen.uint32(in: 0...255))
        await propertyCheck(count: 300, input: call.array(of: 1...60)) { calls in
            let b = ModelBackend(checkTransitions: true)
            // Both binding-ownership policies, chosen by the first call.
            try? b.setBindingOwnership(calls.first.map { $0.4 % 2 == 0 } == true ? .memslotHoldsFile : .fileHoldsVM)
            var maps: [Mapping] = []
            var pins: [ObjectHandle] = []
            var refs: [ObjectHandle] = []
            var domains: [ObjectHandle] = []
            for (op, fdRaw, x, y, small) in calls {
                let fd = FD(Int32(fdRaw))
                let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: small), count: Int(small % 9))
                switch op {
                case 0: _ = try? b.createVM(type: [0, 1, 4, 5][Int(small % 4)], conversion: small % 2 == 0 ? .inPlace : .attributes)
                case 1: _ = try? b.createGuestMemfd(on: small % 5 == 0 ? nil : fd, size: x, flags: UInt64(small % 4))
                case 2: _ = try? b.fallocate(fd, mode: small, offset: x, length: y)
                case 3:
                    if let m = try? b.mmap(fd: small % 2 == 0 ? fd : nil, offset: x % (1 << 22), length: y % (1 << 23),
                                           prot: Protection(rawValue: small % 8), shared: small % 3 != 0) {
                        maps.append(m)
                    }
                case 4:
                    if let m = maps.last { _ = try? b.hostWrite(address: m.address &+ (x % (1 << 22)), bytes: bytes) }
                case 5:
                    if let m = maps.last { _ = try? b.hostRead(address: m.address &+ (x % (1 << 22)), count: UInt64(small)) }
                case 6:
                    if let m = maps.popLast() { _ = try? b.munmap(m) }
                case 7:
                    let region = UserMemoryRegion2(
                        slot: small % 6, flags: small % 8, guestPhysAddr: x, memorySize: y % (1 << 24),
                        userspaceAddr: maps.last?.address ?? 0, guestMemfdOffset: x % (1 << 22),
                        guestMemfd: UInt32(truncatingIfNeeded: fdRaw))
                    _ = try? b.setUserMemoryRegion2(vm: fd, region)
                case 8: _ = try? b.setMemoryAttributes(vm: fd, address: x, size: y, attributes: UInt64(small % 2) << 3, flags: 0)
                case 9: _ = try? b.createVCPU(vm: fd, id: small % 2)
                case 10: _ = try? b.guestAccess(vcpu: fd, GuestAccess(gpa: x, kind: .read(count: UInt64(small)), isPrivate: small % 3 == 0 ? nil : small % 3 == 1))
                case 11: _ = try? b.guestAccess(vcpu: fd, GuestAccess(gpa: x &+ y, kind: .write(bytes)))
                case 12: _ = try? b.preFaultMemory(vcpu: fd, gpa: x, size: y % (1 << 24), flags: 0)
                case 13: _ = try? b.close(fd)
                case 14: _ = try? b.memoryFailure(fd: fd, offset: x)
                case 15: _ = try? b.memfdCreate(size: x % (1 << 24), secret: small % 2 == 0)
                case 16: _ = try? b.pwrite(fd, bytes, offset: x % (1 << 22))
                case 17: _ = try? b.ftruncate(fd, size: x % (1 << 24))
                case 18: _ = try? b.lseek(fd, offset: Int64(bitPattern: x), whence: Int32(small % 5))
                case 19: _ = try? b.fstat(fd)
                case 20:
                    _ = try? b.setGuestMemfdAttributes(fd: fd, offset: x % (1 << 22), size: y % (1 << 22),
                                                       attributes: UInt64(small % 2) << 3, flags: UInt64(small / 128))
                case 21:
                    if let m = maps.last, let p = try? b.pin(address: m.address &+ (x % (1 << 22)) & ~4095, length: y % (1 << 16), longterm: small % 2 == 0) {
                        pins.append(p)
                    }
                case 22:
                    if let p = pins.popLast() { _ = try? b.unpin(p) }
                case 23:
                    if small % 4 == 0 { _ = try? b.fork() }
                case 24: _ = try? b.switchProcess(ProcessHandle(pid: 1 + small % 3))
                case 25: _ = try? b.exitProcess(ProcessHandle(pid: 2 + small % 2))
                case 26:
                    if let m = maps.last, let r = try? b.gupFastReference(address: (m.address &+ (x % (1 << 22))) & ~4095, length: 4096 * UInt64(1 + small % 3)) {
                        refs.append(r)
                    }
                case 27:
                    if let r = refs.popLast() { _ = try? b.dropSpeculativeReferences(r) }
                case 28:
                    if let d = try? b.createIOMMUDomain([.vfio, .hypervisor, .nested, .sva][Int(small % 4)], vm: small % 4 == 2 ? fd : nil) { domains.append(d) }
                case 29:
                    if let d = domains.last {
                        _ = try? b.iommuMap(domain: d, iova: x % (1 << 24), address: small % 2 == 0 ? maps.last?.address : nil,
                                            fd: small % 2 == 0 ? nil : fd, offset: y % (1 << 22), length: 4096 * UInt64(1 + small % 4))
                    }
                case 30:
                    if let d = domains.last { _ = try? b.iommuUnmap(domain: d, iova: x % (1 << 24), length: 4096 * UInt64(small % 8)) }
                case 32:
                    if let m = maps.last { _ = try? b.mprotect(address: m.address, length: y % (1 << 22), prot: Protection(rawValue: small % 8)) }
                case 31:
                    if let d = domains.last { _ = try? b.dma(domain: d, iova: x % (1 << 24), write: small % 2 == 0 ? bytes : nil, count: UInt64(bytes.count)) }
                default: _ = try? b.checkExtension(on: fdRaw < 0 ? nil : fd, Capability.allCases[Int(small) % Capability.allCases.count])
                }
                b.kernel.checkInvariants()
                let violations = (try? b.checkInvariants()) ?? []
                #expect(violations.isEmpty, "\(violations) after call \(op)")
            }
        }
    }
}

/// In-place conversion against a per-page reference: shareability, pins, and what the
/// host can touch.
@Suite("Conversion properties")
struct ConversionPropertyTests {
    static let pages = 16

    enum Op: Sendable, CustomStringConvertible {
        case convert(lo: Int, hi: Int, toPrivate: Bool)
        case pin(page: Int)
        case unpin
        case touch(page: Int)
        var description: String {
            switch self {
            case .convert(let lo, let hi, let p): "convert(\(lo)..<\(hi), \(p ? "private" : "shared"))"
            case .pin(let p): "pin(\(p))"
            case .unpin: "unpin"
            case .touch(let p): "touch(\(p))"
            }
        }
    }

    static let op = PropertyBased.zip(Gen.int(in: 0...3), Gen.int(in: 0...15), Gen.int(in: 1...16), Gen.bool).map { kind, a, b, p -> Op in
        switch kind {
        case 0: .convert(lo: min(a, b - 1), hi: max(a + 1, b), toPrivate: p)
        case 1: .pin(page: a)
        case 2: .unpin
        default: .touch(page: a)
        }
    }

    @Test func toPrivateSucceedsExactlyWhenNothingPinsTheRange() async {
        await propertyCheck(count: 200, input: Self.op.array(of: 1...40)) { ops in
            var k = Kernel()
            guard let vm = try? k.createVM(type: VMType.swProtected.number, conversion: .inPlace),
                let gmem = try? k.createGuestMemfd(on: vm, size: UInt64(Self.pages) * 4096, flags: MMAP | INIT_SHARED),
                let map = try? k.mmap(fd: gmem, offset: 0, length: UInt64(Self.pages) * 4096, prot: [.read, .write], shared: true)
            else {
                Issue.record("setup failed")
                return
            }
            var isPrivate = [Bool](repeating: false, count: Self.pages)
            var held: [(id: UInt64, page: Int)] = []
            for op in ops {
                switch op {
                case .convert(let lo, let hi, let toPrivate):
                    let out = k.setGuestMemfdAttributes(gmem, offset: UInt64(lo) * 4096, size: UInt64(hi - lo) * 4096,
                                                         attributes: toPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0)
                    let firstPinned = (lo..<hi).first { p in held.contains { $0.page == p } }
                    let changes = (lo..<hi).contains { isPrivate[$0] != toPrivate }
                    if toPrivate, changes, let busy = firstPinned {
                        #expect(out == ConversionOutcome(errno: .EAGAIN, errorOffset: UInt64(busy) * 4096), "\(op)")
                    } else {
                        #expect(out.errno == nil, "\(op)")
                        for p in lo..<hi { isPrivate[p] = toPrivate }
                    }
                case .pin(let page):
                    let got = try? k.pin(address: map.address + UInt64(page) * 4096, length: 4096, longterm: false)
                    #expect((got != nil) == !isPrivate[page], "GUP pins shared pages only: \(op)")
                    if let got { held.append((got, page)) }
                case .unpin:
                    if let p = held.popLast() { try? k.unpin(p.id) }
                case .touch(let page):
                    let r = k.hostAccess(address: map.address + UInt64(page) * 4096, count: 1, write: [1])
                    #expect((r == .completed([])) == !isPrivate[page], "the host reaches shared pages only: \(op)")
                }
                let ino = k.gmemInodes.keys.first!
                for p in 0..<Self.pages {
                    #expect(k.gmemInodes[ino]!.privatePages.value(at: UInt64(p)) == isPrivate[p])
                }
                #expect(k.checkSystemInvariants().isEmpty, "after \(op)")
                // Isolation: no private page is mapped or pinned by the host.
                for (pgoff, pfn) in k.gmemInodes[ino]!.folios where isPrivate[Int(pgoff)] {
                    #expect(k.phys[pfn].mapcount == 0 && k.phys[pfn].pincount == 0, "private page \(pgoff) reachable after \(op)")
                }
                k.checkInvariants()
            }
        }
    }
}
