import GMemBackend
import Testing

@testable import GMemModel

@Suite("Lifetime")
struct LifetimeTests {
    @Test func theFileHoldsTheVMAndTheVMDoesNotHoldTheFile() throws {
        var k = Kernel()
        let (vmFD, gmem) = try k.vmWithGmem(size: 2 * M, flags: MMAP)
        let vm = try k.vmFD(vmFD)
        try k.close(vmFD)
        #expect(k.vms[vm] != nil, "the guest_memfd still holds the VM")
        try k.fallocate(gmem, mode: KEEP, offset: 0, length: 2 * M)
        try k.close(gmem)
        #expect(k.vms[vm] == nil, "the last reference is gone with the file")
        #expect(k.gmemInodes.isEmpty)
        #expect(k.phys.allocatedFrames == 0, "the inode's memory is freed")
        k.checkInvariants()
    }

    @Test func closingTheFileTurnsGuestAccessesIntoMemoryFaults() throws {
        var k = Kernel()
        let (vm, gmem) = try k.vmWithGmem(size: 2 * M, flags: MMAP)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 2 * M, userspaceAddr: 0,
            guestMemfd: UInt32(gmem)))
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .write([1, 2, 3]))) == .completed([]))
        #expect(!k.vms[try k.vmFD(vm)]!.spte.isEmpty)
        try k.close(gmem)
        #expect(k.vms[try k.vmFD(vm)]!.spte.isEmpty, "release zaps every SPTE the file backed")
        let outcome = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G + 4096, kind: .read(count: 1)))
        #expect(outcome == .failed(.EFAULT, .memoryFault(flags: 0, gpa: G + 4096, size: 4096)))
        k.checkInvariants()
    }

    @Test func aMappingKeepsTheFileAlive() throws {
        var k = Kernel()
        let (_, gmem) = try k.vmWithGmem(size: 16 * K, flags: MMAP | INIT_SHARED)
        let map = try k.mmap(fd: gmem, offset: 0, length: 16 * K, prot: [.read, .write], shared: true)
        _ = k.hostAccess(address: map.address, count: 2, write: [9, 9])
        try k.close(gmem)
        #expect(k.gmemInodes.count == 1)
        #expect(k.hostAccess(address: map.address, count: 2, write: nil) == .completed([9, 9]))
        try k.munmap(map)
        #expect(k.gmemInodes.isEmpty && k.vms.isEmpty == false)
        #expect(k.phys.allocatedFrames == 0)
        k.checkInvariants()
    }

    @Test func dataSurvivesUnbindAndRebindAtAnotherOffset() throws {
        var k = Kernel()
        let (vm, gmem) = try k.vmWithGmem(size: 8 * 4096, flags: MMAP)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        func bind(_ slot: UInt32, gpa: UInt64, offset: UInt64, pages: UInt64) throws(Errno) {
            try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: slot, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: gpa, memorySize: pages * 4096,
                userspaceAddr: 0, guestMemfdOffset: offset, guestMemfd: UInt32(gmem)))
        }
        try bind(0, gpa: G, offset: 0, pages: 8)
        _ = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G + 5 * 4096, kind: .write([0x55])))
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(slot: 0, flags: 0, guestPhysAddr: 0, memorySize: 0, userspaceAddr: 0))
        // File page 5 appears at slot page 1 when bound from offset 4 pages.
        try bind(3, gpa: 2 * G, offset: 4 * 4096, pages: 4)
        #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 2 * G + 4096, kind: .read(count: 1))) == .completed([0x55]))
        k.checkInvariants()
    }

    @Test func withMemslotsHoldingTheFileTheLastUnbindReleasesIt() throws {
        var k = Kernel()
        k.config.bindingOwnership = .memslotHoldsFile
        let gmem = try k.createGuestMemfd(on: nil, size: 2 * M, flags: MMAP)
        let vm = try k.createVM(type: 0)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 2 * M, userspaceAddr: 0,
            guestMemfd: UInt32(gmem)))
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        _ = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .write([7])))
        try k.close(gmem)
        #expect(k.gmemInodes.count == 1, "the memslot holds the file")
        #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .read(count: 1))) == .completed([7]))
        try k.close(vm)
        try k.close(vcpu)
        #expect(k.vms.isEmpty, "the file does not hold the VM")
        #expect(k.gmemInodes.isEmpty && k.phys.allocatedFrames == 0, "VM teardown deleted the slot, which released the file")
        k.checkInvariants()
    }

    @Test func punchFreesFramesAndZapsEveryMapping() throws {
        var k = Kernel()
        let (vm, gmem) = try k.vmWithGmem(size: 1 * M, flags: MMAP | INIT_SHARED)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 1 * M, userspaceAddr: 0,
            guestMemfd: UInt32(gmem)))
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        let map = try k.mmap(fd: gmem, offset: 0, length: 1 * M, prot: [.read, .write], shared: true)
        _ = k.hostAccess(address: map.address, count: 1 * M, write: [UInt8](repeating: 1, count: Int(1 * M)))
        _ = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .read(count: 1 * M)))
        #expect(k.phys.allocatedFrames == 256)
        try k.fallocate(gmem, mode: KEEP | PUNCH, offset: 0, length: 1 * M)
        #expect(k.phys.allocatedFrames == 0, "no PTE, SPTE or page-cache reference survives the punch")
        #expect(k.mm.ptes.isEmpty)
        #expect(k.vms[try k.vmFD(vm)]!.spte.isEmpty)
        k.checkInvariants()
    }

    @Test func aTerabyteCostsNothingUntilTouched() throws {
        var k = Kernel()
        let (_, gmem) = try k.vmWithGmem(size: 1 << 40, flags: MMAP | INIT_SHARED)
        try k.fallocate(gmem, mode: KEEP, offset: 0, length: 1 << 40)
        #expect(k.phys.allocatedFrames == 0)
        let inode = k.gmemInodes.values.first!
        #expect(inode.state.runCount == 2, "one run for the allocated terabyte, one for the hole beyond EOF")
    }
}

@Suite("Policy comparison")
struct PolicyComparisonTests {
    @Test func everyShippedPolicyCombinationKeepsTheInvariants() {
        let rows = PolicyComparison.runAll()
        #expect(rows.count == 16)
        for r in rows {
            let name = "\(r.conversion.rawValue)/\(r.binding.rawValue)/\(r.iommu.rawValue)"
            #expect(r.violations.isEmpty, "\(name): \(r.violations)")
            #expect(!r.afterClose.hasPrefix("workload failed"), "\(name): \(r.afterClose)")
            // In place, a device that still holds the pages refuses the conversion.
            if r.conversion == .inPlace && (r.iommu == .vfio || r.iommu == .hypervisor) { #expect(r.unsafeOrderRefused, "\(name)") }
            // Upstream the closed file takes the memory away; the alternative keeps it.
            #expect(r.afterClose == (r.binding == .fileHoldsVM ? "EFAULT" : "ok"), "\(name)")
            // In-place conversion preserves on sw_protected; the x86 model discards.
            #expect(r.deviceDataKept == (r.conversion == .inPlace ? 16 : 0), "\(name)")
        }
    }
}
