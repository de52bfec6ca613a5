#if canImport(Glibc)
import Glibc
#endif
import GMemBackend
import GMemKernel
import GMemModel
import GMemVMM

/// The VMM side: doorbell round trips against bare exits on the real vCPU, and the
/// model's conversions per second.
func vmmBenchmarks() {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"vmm conversions doorbell".contains(only) { return }
    print("")
    print("the VMM side, median of \(runs) runs:")

    // Model: conversions per second through the manager, 4K and 2M, in place.
    for (pages, label) in [(UInt64(1), "4K"), (UInt64(512), "2M")] {
        let count = pages == 1 ? 20_000 : 200
        measure("model: manager conversions of \(label) ranges (to-shared and back)", unit: "us/conv", scale: 1e6 / Double(2 * count),
                setup: { () -> ConversionManager in
            let b = ModelBackend()
            let vm = try! b.createVM(type: VMType.swProtected.number, conversion: .inPlace)
            let size = 64 * M
            let gmem = try! b.createGuestMemfd(on: vm, size: size, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
            try! b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: size, userspaceAddr: 0, guestMemfd: UInt32(gmem.raw)))
            return ConversionManager(backend: b, vm: vm, policy: .inPlace, regions: [ManagedRegion(gpa: G, size: size, gmem: gmem)])
        }) { m in
            for i in 0..<count {
                let gpa = G + (UInt64(i) % (64 * M / (pages * 4096))) * pages * 4096
                try! m.convert(gpa: gpa, size: pages * 4096, toPrivate: false)
                try! m.convert(gpa: gpa, size: pages * 4096, toPrivate: true)
            }
        }
    }

    // Kernel: the same vCPU, a program of bare exits, then one of doorbell requests.
    guard KernelBackend.unavailableReason() == nil else {
        print("doorbell on the real vCPU: skipped (\(KernelBackend.unavailableReason()!))")
        return
    }
    let exits = 2000
    struct Setup { var k: KernelBackend; var vcpu: FD; var handler: GuestRequestHandler }
    func setup() -> Setup {
        let k = try! KernelBackend()
        let vm = try! k.createVM(type: 0)
        let gmem = try! k.createGuestMemfd(on: vm, size: 4 * M, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        try! k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 4 * M, userspaceAddr: 0, guestMemfd: UInt32(gmem.raw)))
        let vcpu = try! k.createVCPU(vm: vm, id: 0)
        // Warm the vCPU and the harness up.
        _ = try! k.runGuestProgram(vcpu: vcpu, GuestProgram([.report(0)])) { _ in 0 }
        let m = ConversionManager(backend: k, vm: vm, policy: .attributes, regions: [ManagedRegion(gpa: G, size: 4 * M, gmem: gmem)])
        return Setup(k: k, vcpu: vcpu, handler: GuestRequestHandler(manager: m))
    }
    var bare = 0.0
    var doorbell = 0.0
    var samples: ([Double], [Double]) = ([], [])
    var inManager: [Double] = []
    for _ in 0..<runs {
        let s = setup()
        let reports = GuestProgram((0..<exits).map { .report(UInt32($0)) })
        var t0 = now()
        _ = try! s.k.runGuestProgram(vcpu: s.vcpu, reports) { _ in 0 }
        samples.0.append((now() - t0) * 1e6 / Double(exits))
        let requests = GuestProgram((0..<exits).map { i in
            .convert(ConversionRequest(gpa: G + UInt64(i % 512) * 4096, npages: 1, toPrivate: i % 2 == 0, channel: .doorbell))
        })
        var managerTime = 0.0
        t0 = now()
        _ = try! s.k.runGuestProgram(vcpu: s.vcpu, requests) { r in
            let t = now()
            defer { managerTime += now() - t }
            return s.handler.handle(r)
        }
        samples.1.append((now() - t0) * 1e6 / Double(exits))
        inManager.append(managerTime * 1e6 / Double(exits))
    }
    samples.0.sort()
    samples.1.sort()
    bare = samples.0[samples.0.count / 2]
    doorbell = samples.1[samples.1.count / 2]
    report("kernel: bare port-I/O exit round trip (x\(exits))", bare, samples.0.first!, samples.0.last!, "us/exit")
    report("kernel: one-page doorbell conversion round trip (x\(exits))", doorbell, samples.1.first!, samples.1.last!, "us/conv")
    inManager.sort()
    let manager = inManager[inManager.count / 2]
    report("  of which in the VMM's manager (incl. its ioctl)", manager, inManager.first!, inManager.last!, "us/conv")
    print(pad("  the manager's cost against a bare exit", 56) + pad(fixed(manager / bare * 100, 1), 11, right: true) + " %")
    print(pad("  the doorbell round trip against a bare exit", 56) + pad(fixed((doorbell / bare - 1) * 100, 1), 11, right: true) + " % more")
}
