import GMemBackend
import GMemModel
import GMemScenario

#if canImport(Glibc)
import Glibc
#endif

/// The explorer's throughput: steps, schedules and distinct states per second on a
/// race with three actors (a vCPU faulting and writing four pages, a VMM punching two
/// of them, another VMM thread flipping one to shared), exhaustive with preemption
/// bound 2 and random.
func explorerBenchmarks() {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"explorer".contains(only) { return }
    print("")
    print("the explorer (3 actors, 15 steps, every invariant checked after each step), median of \(runs) runs:")
    let base: UInt64 = 1 << 30
    var k = Kernel()
    let vm = try! k.createVM(type: VMType.swProtected.number)
    let gmem = try! k.createGuestMemfd(on: vm, size: 16 * K, flags: 0)
    try! k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
        slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: base, memorySize: 16 * K, userspaceAddr: 0, guestMemfd: UInt32(gmem)))
    _ = try! k.setMemoryAttributes(vm: vm, address: base, size: 16 * K, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
    try! k.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 16 * K)
    let vcpu = try! k.createVCPU(vm: vm, id: 0)

    let vcpuActor = writer(vcpu: vcpu, gpas: (0..<UInt64(4)).map { base + $0 * 4 * K })
    let punch = puncher(gmem: gmem, pages: [1, 3])
    let share = ExploreActor("share", [ExploreStep("to shared 2") { w, _ in
        _ = try? w.kernel.setMemoryAttributes(vm: vm, address: base + 8 * K, size: 4 * K, attributes: 0, flags: 0)
        return StepResult("shared")
    }])
    let e = Explorer(initial: World(kernel: k), actors: [vcpuActor, punch, share])

    measureExploration("exhaustive, preemption bound 2") { e.exhaustive(preemptionBound: 2) }
    measureExploration("random, 2,000 schedules") { e.random(seed: 1, count: 2_000) }
}

/// A vCPU that faults (split at mmu_lock) and writes one byte at each of `gpas`.
func writer(vcpu: Int32, gpas: [UInt64]) -> ExploreActor {
    var steps: [ExploreStep] = []
    for gpa in gpas {
        steps += ExploreStep.guestFault(at: steps.count, gpa: gpa, write: true) { _ in vcpu }
        steps.append(ExploreStep("write 0x\(String(gpa, radix: 16))", effect: .writes) { w, _ in
            _ = try? w.kernel.guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: .write([0x5a])))
            return StepResult("written")
        })
    }
    return ExploreActor("vcpu", steps)
}

/// A VMM thread that punches each of `pages` (4K page indices) out of `gmem`.
func puncher(gmem: Int32, pages: [UInt64]) -> ExploreActor {
    ExploreActor("vmm", pages.map { page in
        ExploreStep("punch \(page)", effect: .destructive) { w, _ in
            try? w.kernel.fallocate(gmem, mode: UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_KEEP_SIZE, offset: page * 4 * K, length: 4 * K)
            return StepResult("punched")
        }
    })
}

/// Runs `body` `runs` times and reports the median time and the rates.
func measureExploration(_ what: String, _ body: () -> ExploreSummary) {
    var last = ExploreSummary()
    var seconds: [Double] = []
    for _ in 0..<runs {
        let t0 = now()
        last = body()
        seconds.append(now() - t0)
    }
    seconds.sort()
    precondition(last.counterexample == nil, "the shipped model broke an invariant under exploration")
    let t = seconds[seconds.count / 2]
    print("\(what): \(last.schedules) schedules, \(last.states) distinct states, \(last.steps) steps")
    report("  time", t * 1e3, seconds.first! * 1e3, seconds.last! * 1e3, "ms")
    report("  steps per second", Double(last.steps) / t, Double(last.steps) / seconds.last!, Double(last.steps) / seconds.first!, "steps/s")
    report("  distinct states per second", Double(last.states) / t, Double(last.states) / seconds.last!, Double(last.states) / seconds.first!, "states/s")
    report("  schedules per second", Double(last.schedules) / t, Double(last.schedules) / seconds.last!, Double(last.schedules) / seconds.first!, "sched/s")
}

/// The largest bundled race, scenarios/explore/conversion-storm.json (5 actors, 15
/// steps: two vCPUs, in-place conversions, GUP-fast, a host read, a punch), from its
/// file as `gmem explore` runs it: exhaustive with preemption bounds 2 and 3, random.
func stormBenchmarks() {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"explorer storm".contains(only) { return }
    // Sources/gmem-bench/Explore.swift -> the repository root.
    let root = "\(#filePath)".split(separator: "/").dropLast(4).joined(separator: "/")
    let path = "/" + root + "/scenarios/explore/conversion-storm.json"
    guard let f = fopen(path, "rb") else { print("(no \(path): skipped)"); return }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while case let n = fread(&buf, 1, buf.count, f), n > 0 { bytes += buf[0..<n] }
    fclose(f)
    let scenario = try! ScenarioParser.parse(text: String(decoding: bytes, as: UTF8.self), file: path)
    let runner = ExploreRunner(scenario)
    precondition(runner.setupFailures.isEmpty)
    let e = runner.explorer
    print("")
    print("conversion-storm.json (\(e.actors.count) actors, \(e.actors.reduce(0) { $0 + $1.steps.count }) steps, every invariant checked after each step), median of \(runs) runs:")
    measureExploration("exhaustive, preemption bound 2") { e.exhaustive(preemptionBound: 2) }
    measureExploration("exhaustive, preemption bound 3") { e.exhaustive(preemptionBound: 3) }
    measureExploration("random, 2,000 schedules") { e.random(seed: 1, count: 2_000) }
}

/// The explorer on a large world: a 1 GiB guest whose memory attributes alternate on
/// every 4K page (262,144 ranges) and whose first 256 MiB are faulted in (65,536
/// SPTEs, page-cache entries and frames), with a vCPU faulting and writing pages
/// while the VMM punches them. Every state is a snapshot of the whole kernel, hashed
/// and compared whole, so this shows what copy-on-write B+trees with digests cached
/// in their nodes buy.
func largeWorldBenchmarks() {
    if let only = getenv("GMEM_BENCH_ONLY").map({ String(cString: $0) }), !"explorer large".contains(only) { return }
    let base: UInt64 = 1 << 30
    var k = Kernel()
    let vm = try! k.createVM(type: VMType.swProtected.number)
    let gmem = try! k.createGuestMemfd(on: vm, size: G, flags: 0)
    try! k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
        slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: base, memorySize: G, userspaceAddr: 0, guestMemfd: UInt32(gmem)))
    for page in stride(from: UInt64(0), to: G / (4 * K), by: 2) {
        _ = try! k.setMemoryAttributes(vm: vm, address: base + page * 4 * K, size: 4 * K, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
    }
    try! k.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 256 * M)
    let vcpu = try! k.createVCPU(vm: vm, id: 0)
    // Fault in 256 MiB (65,536 pages: as many SPTEs, page-cache entries and frames).
    for page in stride(from: UInt64(8), to: 256 * M / (4 * K), by: 1) {
        let gpa = base + page * 4 * K
        _ = try! k.guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: .read(count: 1), isPrivate: page % 2 == 0))
    }
    let e = Explorer(initial: World(kernel: k), actors: [
        writer(vcpu: vcpu, gpas: [0, 2, 4].map { base + $0 * 4 * K }), puncher(gmem: gmem, pages: [0, 4]),
    ])
    print("")
    print("the explorer on a 1 GiB guest with 262,144 attribute ranges and 65,536 faulted pages (2 actors, 11 steps), median of \(runs) runs:")
    measureExploration("exhaustive, preemption bound 2") { e.exhaustive(preemptionBound: 2) }
}
