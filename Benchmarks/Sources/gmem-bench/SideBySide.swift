#if canImport(Glibc)
import Glibc
#endif
import GMemBackend
import GMemKernel
import GMemModel

/// The same operations through the Backend protocol on the model and on the real
/// kernel, one after the other in this process.
func sideBySide() {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"side by side".contains(only) { return }
    print("")
    guard KernelBackend.unavailableReason() == nil, let probe = try? KernelBackend() else {
        print("side by side with the kernel: skipped (\(KernelBackend.unavailableReason() ?? "no kernel backend"))")
        return
    }
    let config = ModelConfig.standing(for: probe.hostProfile)
    print("side by side, through the Backend protocol (model | kernel), median of \(runs) runs:")
    let makers: [(String, () -> any Backend)] = [
        ("model", { ModelBackend(config: config) }),
        ("kernel", { try! KernelBackend() }),
    ]

    func row(_ name: String, unit: String, scale: Double, _ body: (any Backend) -> Void) {
        var cells: [String] = []
        for (_, make) in makers {
            var samples: [Double] = []
            for _ in 0..<runs {
                let b = make()
                let t0 = now()
                body(b)
                samples.append((now() - t0) * scale)
            }
            samples.sort()
            cells.append(fixed(samples[samples.count / 2], samples[samples.count / 2] < 10 ? 3 : 1))
        }
        print(pad(name, 52) + pad(cells[0], 11, right: true) + " | " + pad(cells[1], 11, right: true) + " " + unit)
        fflush(nil)
    }

    func gmem(_ b: any Backend, size: UInt64, flags: UInt64) -> (FD, FD) {
        let vm = try! b.createVM(type: 0)
        return (vm, try! b.createGuestMemfd(on: vm, size: size, flags: flags))
    }

    row("create a 1 TiB guest_memfd (x200)", unit: "us/create", scale: 1e6 / 200) { b in
        let vm = try! b.createVM(type: 0)
        for _ in 0..<200 { _ = try! b.createGuestMemfd(on: vm, size: 1 << 40, flags: 0) }
    }
    for (chunk, label) in [(4 * K, "4K"), (2 * M, "2M")] {
        row("fallocate + punch 1 GiB in \(label) chunks", unit: "ms", scale: 1e3) { b in
            let (_, fd) = gmem(b, size: G, flags: 0)
            var off: UInt64 = 0
            while off < G { try! b.fallocate(fd, mode: KEEP, offset: off, length: chunk); off += chunk }
            off = 0
            while off < G { try! b.fallocate(fd, mode: KEEP | PUNCH, offset: off, length: chunk); off += chunk }
        }
    }
    row("host first touch of 1 GiB (one load per page)", unit: "ns/page", scale: 1e9 / 262_144) { b in
        let (_, fd) = gmem(b, size: G, flags: 3)
        let map = try! b.mmap(fd: fd, offset: 0, length: G, prot: [.read, .write], shared: true)
        var addr = map.address
        while addr < map.address + G {
            _ = try! b.hostRead(address: addr, count: 1)
            addr += 4 * K
        }
        try! b.munmap(map)
    }
    for write in [false, true] {
        row("guest \(write ? "writes" : "reads") 256 MiB in one access (faults every page)", unit: "ns/page", scale: 1e9 / 65_536) { b in
            let (vm, fd) = gmem(b, size: 256 * M, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
            try! b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 256 * M, userspaceAddr: 0,
                guestMemfd: UInt32(fd.raw)))
            let vcpu = try! b.createVCPU(vm: vm, id: 0)
            let kind: GuestAccess.Kind = write ? .write([UInt8](repeating: 0x5a, count: Int(256 * M))) : .read(count: 256 * M)
            _ = try! b.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: kind))
        }
    }
    row("guest access round trip, 1 byte, page mapped (x2000)", unit: "us/access", scale: 1e6 / 2000) { b in
        let (vm, fd) = gmem(b, size: 2 * M, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        try! b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 2 * M, userspaceAddr: 0,
            guestMemfd: UInt32(fd.raw)))
        let vcpu = try! b.createVCPU(vm: vm, id: 0)
        _ = try! b.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .read(count: 1)))
        for _ in 0..<2000 { _ = try! b.guestAccess(vcpu: vcpu, GuestAccess(gpa: G, kind: .read(count: 1))) }
    }
}
