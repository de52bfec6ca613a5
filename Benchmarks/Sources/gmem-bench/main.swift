// gmem-bench: the model's costs for the operations docs/benchmarks.md reports, beside
// memset and memcpy measured in the same run. Each figure is the median of N runs
// (GMEM_BENCH_RUNS, default 5) with the min and max. GMEM_BENCH_ONLY=text runs only
// the figures whose name contains the text.
#if canImport(Glibc)
import Glibc
#endif
import CHeapStats
import GMemBackend
import GMemModel

let K: UInt64 = 1 << 10
let M: UInt64 = 1 << 20
let G: UInt64 = 1 << 30
let KEEP = UAPI.FALLOC_FL_KEEP_SIZE
let PUNCH = UAPI.FALLOC_FL_PUNCH_HOLE
let runs = getenv("GMEM_BENCH_RUNS").flatMap { Int(String(cString: $0)) } ?? 5

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Bytes the C heap has handed out, small blocks and mmapped ones.
func heapInUse() -> Int { Int(gmem_heap_in_use()) }

func fixed(_ v: Double, _ places: Int) -> String {
    var scale = 1.0
    for _ in 0..<places { scale *= 10 }
    let n = Int((v * scale).rounded())
    let whole = n / Int(scale)
    let frac = String(n % Int(scale))
    return places == 0 ? "\(whole)" : "\(whole)." + String(repeating: "0", count: places - frac.count) + frac
}

func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, n - s.count))
    return right ? fill + s : s + fill
}

func report(_ name: String, _ median: Double, _ lo: Double, _ hi: Double, _ unit: String) {
    let places = median < 10 ? 3 : 1
    print(pad(name, 56) + pad(fixed(median, places), 11, right: true) + " " + pad(unit, 10)
          + " (" + fixed(lo, places) + "-" + fixed(hi, places) + ")")
    fflush(nil)
}

/// Times `body` on a fresh `setup()` value `runs` times; reports seconds times `scale`.
func measure<S>(_ name: String, unit: String, scale: Double, setup: () -> S, _ body: (inout S) -> Void) {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !name.contains(only) { return }
    var samples: [Double] = []
    for _ in 0..<runs {
        var state = setup()
        let t0 = now()
        body(&state)
        samples.append((now() - t0) * scale)
    }
    samples.sort()
    report(name, samples[samples.count / 2], samples.first!, samples.last!, unit)
}

/// A VM of `type` with one guest_memfd; returns the kernel, the VM fd and the gmem fd.
func vmWithGmem(type: VMType = .default, size: UInt64, flags: UInt64 = 0) -> (Kernel, Int32, Int32) {
    var k = Kernel()
    let vm = try! k.createVM(type: type.number)
    let fd = try! k.createGuestMemfd(on: vm, size: size, flags: flags)
    return (k, vm, fd)
}

print("gmem-bench: model figures, median of \(runs) runs (min-max), one thread")
print("")

measure("create a 1 TiB guest_memfd", unit: "us/create", scale: 1e6 / 1000, setup: { () -> (Kernel, Int32) in
    var k = Kernel()
    let vm = try! k.createVM(type: 0)
    return (k, vm)
}) { s in
    for _ in 0..<1000 { _ = try! s.0.createGuestMemfd(on: s.1, size: 1 << 40, flags: 0) }
}

for (chunk, label) in [(4 * K, "4K"), (2 * M, "2M")] {
    let calls = G / chunk
    measure("fallocate 1 GiB in \(label) chunks (\(calls) calls)", unit: "ms", scale: 1e3,
            setup: { vmWithGmem(size: G) }) { s in
        var off: UInt64 = 0
        while off < G {
            try! s.0.fallocate(s.2, mode: KEEP, offset: off, length: chunk)
            off += chunk
        }
    }
    measure("punch 1 GiB in \(label) chunks (\(calls) calls)", unit: "ms", scale: 1e3, setup: { () -> (Kernel, Int32, Int32) in
        var s = vmWithGmem(size: G)
        try! s.0.fallocate(s.2, mode: KEEP, offset: 0, length: G)
        return s
    }) { s in
        var off: UInt64 = 0
        while off < G {
            try! s.0.fallocate(s.2, mode: KEEP | PUNCH, offset: off, length: chunk)
            off += chunk
        }
    }
}

// Every other 4K page of 1 GiB private: 131,072 calls leave 262,144 ranges.
let attributeRanges = Double(G / (4 * K))
var bytesPerRange = 0.0
measure("set_memory_attributes on alternating 4K pages of 1 GiB", unit: "ns/range", scale: 1e9 / attributeRanges,
        setup: { () -> (Kernel, Int32) in
    var k = Kernel()
    let vm = try! k.createVM(type: VMType.swProtected.number)
    return (k, vm)
}) { s in
    let before = heapInUse()
    var gpa: UInt64 = 0
    while gpa < G {
        try! s.0.setMemoryAttributes(vm: s.1, address: gpa, size: 4 * K, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        gpa += 8 * K
    }
    bytesPerRange = Double(heapInUse() - before) / attributeRanges
}
if bytesPerRange != 0 { print(pad("  memory that attribute state takes", 56) + pad(fixed(bytesPerRange, 1), 11, right: true) + " bytes/range") }

func guestFaultIn(_ name: String, write: Bool) {
    measure(name, unit: "ns/fault", scale: 1e9 / 65_536, setup: { () -> (Kernel, Int32) in
        var s = vmWithGmem(size: 256 * M, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        try! s.0.setUserMemoryRegion2(vm: s.1, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: G, memorySize: 256 * M, userspaceAddr: 0,
            guestMemfd: UInt32(s.2)))
        let vcpu = try! s.0.createVCPU(vm: s.1, id: 0)
        return (s.0, vcpu)
    }) { s in
        var gpa = G
        let access: GuestAccess.Kind = write ? .write([1]) : .read(count: 1)
        while gpa < G + 256 * M {
            _ = try! s.0.guestAccess(vcpu: s.1, GuestAccess(gpa: gpa, kind: access))
            gpa += 4 * K
        }
    }
}
guestFaultIn("guest fault-in of 256 MiB, reads (65,536 faults)", write: false)
guestFaultIn("guest fault-in of 256 MiB, writes (65,536 faults)", write: true)

measure("host first touch of 1 GiB via mmap (262,144 faults)", unit: "ns/fault", scale: 1e9 / 262_144,
        setup: { () -> (Kernel, UInt64) in
    var s = vmWithGmem(size: G, flags: UAPI.GUEST_MEMFD_FLAG_MMAP | UAPI.GUEST_MEMFD_FLAG_INIT_SHARED)
    let map = try! s.0.mmap(fd: s.2, offset: 0, length: G, prot: [.read, .write], shared: true)
    return (s.0, map.address)
}) { s in
    var addr = s.1
    while addr < s.1 + G {
        _ = s.0.hostRead(address: addr)
        addr += 4 * K
    }
}

sideBySide()
vmmBenchmarks()
explorerBenchmarks()
stormBenchmarks()
largeWorldBenchmarks()

if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"baselines".contains(only) { exit(0) }
print("")
print("baselines, same run:")
let size = Int(G)
let dst = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
let src = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
memset(dst, 1, size)
memset(src, 2, size)
measure("memset 1 GiB", unit: "ms", scale: 1e3, setup: {}) { _ in memset(dst, 0x5a, size) }
measure("memcpy 1 GiB", unit: "ms", scale: 1e3, setup: {}) { _ in memcpy(dst, src, size) }
measure("memset of one 4K page (clear_page analogue)", unit: "ns/page", scale: 1e9 / 262_144, setup: {}) { _ in
    var off = 0
    while off < size {
        memset(dst + off, 0, 4096)
        off += 4096
    }
}
dst.deallocate()
src.deallocate()
