import GMemBackend
import GMemScenario
import Testing

@testable import GMemModel

/// The explorer over the fault path's two halves: a guest fault resolves its frame
/// without mmu_lock, so a punch or an attribute change can run before it installs
/// the SPTE; the mmu_invalidate_seq recheck is what keeps the stale frame out.
@Suite("Explorer")
struct ExplorerTests {
    static let gpa: UInt64 = 1 << 30

    /// A sw_protected VM whose four pages of guest_memfd are private and allocated.
    static func world(_ config: ModelConfig) throws -> (World, vcpu: Int32, gmem: Int32, vm: Int32) {
        var k = Kernel(config: config)
        let vm = try k.createVM(type: VMType.swProtected.number)
        let gmem = try k.createGuestMemfd(on: vm, size: 4 * 4096, flags: 0)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: gpa, memorySize: 4 * 4096, userspaceAddr: 0,
            guestMemfd: UInt32(gmem)))
        _ = try k.setMemoryAttributes(vm: vm, address: gpa, size: 4 * 4096, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        try k.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4 * 4096)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        return (World(kernel: k), vcpu, gmem, vm)
    }

    /// A vCPU that writes the first page: fault (resolve), install or retry, access.
    static func vcpu(_ fd: Int32) -> ExploreActor {
        ExploreActor("vcpu0", ExploreStep.guestFault(at: 0, gpa: gpa, write: true) { _ in fd } + [
            ExploreStep("guest write", effect: .writes) { w, _ in
                let o = try? w.kernel.guestAccess(vcpu: fd, GuestAccess(gpa: gpa, kind: .write([0x5a])))
                return StepResult("\(o.map { "\($0)" } ?? "error")")
            },
        ])
    }

    static func punch(_ gmem: Int32) -> ExploreActor {
        ExploreActor("vmm", [
            ExploreStep("fallocate(PUNCH_HOLE) page 0", effect: .destructive) { w, _ in
                let r = Result { () throws(Errno) in
                    try w.kernel.fallocate(gmem, mode: UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4096)
                }
                return StepResult((try? r.get()) != nil ? "punched" : "failed")
            }
        ])
    }

    static func toShared(_ vm: Int32) -> ExploreActor {
        ExploreActor("vmm", [
            ExploreStep("KVM_SET_MEMORY_ATTRIBUTES page 0 shared") { w, _ in
                StepResult((try? w.kernel.setMemoryAttributes(vm: vm, address: gpa, size: 4096, attributes: 0, flags: 0)) != nil ? "shared" : "failed")
            }
        ])
    }

    enum Race: String, CaseIterable { case punch, toShared }

    static func explorer(_ race: Race, _ config: ModelConfig) throws -> Explorer {
        let (w, vcpu, gmem, vm) = try world(config)
        return Explorer(initial: w, actors: [Self.vcpu(vcpu), race == .punch ? punch(gmem) : toShared(vm)])
    }

    @Test("the shipped model survives every interleaving", arguments: Race.allCases)
    func shippedModelHasNoViolation(_ race: Race) throws {
        let s = try Self.explorer(race, .mainline).exhaustive(preemptionBound: 2)
        #expect(s.counterexample == nil, "\(s.counterexample.map { "\($0.schedule): \($0.violations)" } ?? "")")
        #expect(s.schedules >= 3, "fault before, after and inside the window")
        #expect(s.states > 4)
    }

    @Test("without the sequence-count recheck the explorer finds the stale SPTE", arguments: Race.allCases)
    func skipFaultRetryIsCaughtAndReplays(_ race: Race) throws {
        var config = ModelConfig.mainline
        config.mutants = [.skipFaultRetry]
        let e = try Self.explorer(race, config)
        let found = try #require(e.exhaustive(preemptionBound: 2).counterexample)
        // The race needs the other actor inside the fault's window.
        #expect(found.schedule.description == "0.1.0")
        #expect(found.violations.contains { $0.invariant == .coherence })
        let again = e.replay(try #require(Schedule(parsing: found.schedule.description)))
        #expect(again.violations == found.violations)
        #expect(again.trace.map(\.step) == ["fault 0x40000000: resolve", found.trace[1].step, "fault 0x40000000: install"])
        // Random schedules find it too, and a seed names the same schedules.
        let r1 = e.random(seed: 7, count: 200), r2 = e.random(seed: 7, count: 200)
        #expect(r1.counterexample?.schedule == found.schedule)
        #expect(r1.counterexample?.schedule == r2.counterexample?.schedule)
    }

    @Test func theSequenceCountRetryIsTaken() throws {
        let e = try Self.explorer(.punch, .mainline)
        let r = e.replay(Schedule([0, 1, 0, 0, 0, 0]))
        #expect(r.violations.isEmpty)
        #expect(r.trace[2].saw == "stale: RET_PF_RETRY")
        #expect(r.trace.last?.step == "guest write")
    }

    @Test func failingSchedulesAreShrunk() throws {
        var config = ModelConfig.mainline
        config.mutants = [.skipFaultRetry]
        let (w, vcpu, gmem, _) = try Self.world(config)
        let noise = ExploreActor("noise", (0..<3).map { i in ExploreStep("nop \(i)") { _, _ in StepResult("nothing") } })
        let e = Explorer(initial: w, actors: [Self.vcpu(vcpu), Self.punch(gmem), noise])
        let long = Schedule([2, 0, 2, 1, 2, 0, 0])
        let r = e.replay(long)
        #expect(!r.violations.isEmpty)
        let c = e.shrink(Counterexample(schedule: long, trace: r.trace, violations: r.violations, livelock: false))
        #expect(c.schedule == Schedule([0, 1, 0]))
        #expect(e.replay(c.schedule).violations == c.violations)
    }

    /// Only an access that must fault waits on the lock: a page the host already maps
    /// is reached by the hardware, lock or no lock.
    @Test func onlyFaultingHostAccessesWaitOnTheConversion() throws {
        var k = Kernel()
        let vm = try k.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try k.createGuestMemfd(on: vm, size: 4 * 4096, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try k.mmap(fd: gmem, offset: 0, length: 4 * 4096, prot: [.read, .write], shared: true)
        #expect(k.setGuestMemfdAttributes(gmem, offset: 0, size: 2 * 4096, attributes: 0, flags: 0).errno == nil)
        #expect(k.hostAccess(address: map.address + 4096, count: 1, write: [1]) == .completed([]))
        let (pending, _) = k.beginToPrivate(gmem, offset: 0, size: 4096)
        let p = try #require(pending)
        func sleeps(_ k: Kernel, _ body: (inout Kernel) -> Void) -> Bool { k.waits(body) }
        #expect(sleeps(k) { _ = $0.hostAccess(address: map.address, count: 1, write: nil) }, "page 0 was unmapped: its fault waits")
        #expect(!sleeps(k) { _ = $0.hostAccess(address: map.address + 4096, count: 1, write: [2]) }, "page 1 is mapped writable: no fault")
        #expect(sleeps(k) { try? $0.fallocate(gmem, mode: UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_KEEP_SIZE, offset: 8192, length: 4096) },
                "a punch takes the lock exclusively, even elsewhere in the file")
        k.commitToPrivate(p)
        #expect(!sleeps(k) { _ = $0.hostAccess(address: map.address, count: 1, write: nil) }, "the lock is released")
    }

    /// What else waits for a paused conversion's filemap_invalidate_lock (punch and
    /// allocate, memory failure, binding and unbinding the file, its release), and
    /// what waits for a paused memslot deletion's slots_lock (memslot updates,
    /// attribute changes); each is a place the kernel takes the lock.
    @Test func pausedOperationsMakeLockTakersWait() throws {
        var k = Kernel()
        let vmFD = try k.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try k.createGuestMemfd(on: vmFD, size: 8 * 4096, flags: UAPI.GUEST_MEMFD_FLAG_MMAP | UAPI.GUEST_MEMFD_FLAG_INIT_SHARED)
        try k.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 8 * 4096)
        let slot = { (id: UInt32, gpa: UInt64, size: UInt64) in
            UserMemoryRegion2(slot: id, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: gpa, memorySize: size, userspaceAddr: 0,
                              guestMemfdOffset: gpa == Self.gpa ? 0 : 4 * 4096, guestMemfd: UInt32(gmem))
        }
        try k.setUserMemoryRegion2(vm: vmFD, slot(0, Self.gpa, 4 * 4096))
        var converting = k
        _ = try #require(converting.beginToPrivate(gmem, offset: 0, size: 4096).0)
        #expect(converting.waits { try? $0.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4096) })
        #expect(converting.waits { try? $0.memoryFailure(gmem, offset: 4096) })
        #expect(converting.waits { try? $0.setUserMemoryRegion2(vm: vmFD, slot(1, 2 * Self.gpa, 4 * 4096)) }, "bind")
        #expect(converting.waits { try? $0.setUserMemoryRegion2(vm: vmFD, slot(0, Self.gpa, 0)) }, "unbind")
        #expect(!k.waits { try? $0.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4096) }, "nothing paused")

        var deleting = k
        _ = try #require(try deleting.beginSetUserMemoryRegion2(vm: vmFD, slot(0, Self.gpa, 0)))
        #expect(deleting.waits { try? $0.setUserMemoryRegion2(vm: vmFD, slot(1, 2 * Self.gpa, 4 * 4096)) }, "slots_lock")
        #expect(deleting.waits { _ = try? $0.setMemoryAttributes(vm: vmFD, address: 0, size: 4096, attributes: 0, flags: 0) }, "slots_lock")
    }

    /// GUP-fast's grab is folio_try_get(): a folio freed since the walk is not pinned.
    @Test func gupFastDoesNotPinAFreedFolio() throws {
        var k = Kernel()
        let vm = try k.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try k.createGuestMemfd(on: vm, size: 4096, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try k.mmap(fd: gmem, offset: 0, length: 4096, prot: [.read, .write], shared: true)
        _ = k.setGuestMemfdAttributes(gmem, offset: 0, size: 4096, attributes: 0, flags: 0)
        #expect(k.hostAccess(address: map.address, count: 1, write: [1]) == .completed([]))
        var live = try #require(k.gupFastWalk(address: map.address, write: true))
        let pinned = k.gupFastGrab(&live)
        #expect(pinned, "the folio is live: pinned")
        #expect(k.gupFastRecheck(live) != nil)
        try k.unpin(#require(k.pins.keys.first))

        var stale = try #require(k.gupFastWalk(address: map.address, write: true))
        try k.fallocate(gmem, mode: UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4096)
        let grabbed = k.gupFastGrab(&stale)
        #expect(!grabbed, "punched and unmapped since the walk: the folio is gone")
        #expect(k.gupFastRecheck(stale) == nil)
    }

    /// After fork the parent's anonymous PTE is write-protected (copy-on-write):
    /// GUP-fast still walks it for a read, but a write pin (FOLL_WRITE) must take the
    /// slow path, which breaks COW first.
    @Test func gupFastWritePinsNeedAWritablePTE() throws {
        var k = Kernel()
        let map = try k.mmap(fd: nil, offset: 0, length: 4096, prot: [.read, .write], shared: false)
        #expect(k.hostAccess(address: map.address, count: 1, write: [1]) == .completed([]))
        #expect(k.gupFastWalk(address: map.address, write: true) != nil)
        _ = k.fork()
        #expect(k.gupFastWalk(address: map.address, write: false) != nil)
        #expect(k.gupFastWalk(address: map.address, write: true) == nil)
    }

    /// KVM_PRE_FAULT_MEMORY does not wait for a memslot being deleted: EAGAIN
    /// (kvm_mmu_faultin_pfn() with fault->prefetch); once it is gone, the private gfn
    /// has no memslot, which is a memory fault: EFAULT.
    @Test func preFaultDuringADeletionIsEAGAIN() throws {
        var (w, vcpu, _, vm) = try Self.world(.mainline)
        let delete = UserMemoryRegion2(slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: Self.gpa, memorySize: 0, userspaceAddr: 0)
        let p = try #require(try w.kernel.beginSetUserMemoryRegion2(vm: vm, delete))
        #expect(throws: Errno.EAGAIN) { _ = try w.kernel.preFaultMemory(vcpu: vcpu, gpa: Self.gpa, size: 4096, flags: 0) }
        w.kernel.finishMemslotDelete(p)
        #expect(throws: Errno.EFAULT) { _ = try w.kernel.preFaultMemory(vcpu: vcpu, gpa: Self.gpa, size: 4096, flags: 0) }
    }

    @Test func actorsThatAllWaitAreADeadlock() throws {
        let (w, _, _, _) = try Self.world(.mainline)
        let stuck = ExploreActor("stuck", [ExploreStep("wait forever", blocked: { _, _ in true }) { _, _ in StepResult("ran") }])
        let c = try #require(Explorer(initial: w, actors: [stuck]).exhaustive(preemptionBound: 2).counterexample)
        #expect(c.deadlock && c.violations.isEmpty)
    }

    @Test func longRunsReportProgress() throws {
        var e = try Self.explorer(.punch, .mainline)
        let calls = Counter()
        e.progressEvery = 2
        e.onProgress = { s in calls.steps.append(s.steps) }
        let s = e.random(seed: 1, count: 10)
        #expect(calls.steps == Array(stride(from: 2, through: s.steps, by: 2)))
    }

    final class Counter: @unchecked Sendable { var steps: [Int] = [] }

    /// A state reached again with the same preemptions spent but a different actor
    /// last to run has continuations the first arrival could not reach within the
    /// bound: here only b1 a1 a2 b2 (one preemption) has a2 see b1's flag before b2
    /// clears it, and its state after a1 is the one a1 b1 reached before.
    @Test func arrivalsWithAnotherLastActorAreExploredAgain() {
        let flag = 99
        let bad = Violation(invariant: .coherence, page: "flag", parties: ["a2"], detail: "a2 ran between b1 and b2")
        let a = ExploreActor("A", [
            ExploreStep("a1") { _, _ in StepResult("nothing") },
            ExploreStep("a2") { w, _ in StepResult("looked", violations: w.registers[flag] == 1 ? [bad] : []) },
        ])
        let b = ExploreActor("B", [
            ExploreStep("b1") { w, _ in w.registers[flag] = 1; return StepResult("set") },
            ExploreStep("b2") { w, _ in w.registers[flag] = 0; return StepResult("cleared") },
        ])
        let e = Explorer(initial: World(kernel: Kernel()), actors: [a, b])
        let c = e.exhaustive(preemptionBound: 1).counterexample
        #expect(c?.schedule == Schedule([1, 0, 0]))
        #expect(c?.violations == [bad])
    }

    /// Statistics are not state: kernels that differ only in what they counted are the
    /// same state to the explorer; kernels whose pages hold different bytes are not.
    @Test func statesIgnoreStatisticsButNotBytes() throws {
        var a = try Self.world(.mainline).0.kernel
        let pfn = a.phys.allocate()
        var b = a
        b.phys.zero(pfn)
        b.counters.conversionsDone += 3
        #expect(a == b && a.hashValue == b.hashValue)
        b.phys.write(pfn, offset: 0, [9][...])
        a = b
        a.phys.write(pfn, offset: 7, [1][...])
        #expect(a != b)
        var seen: [UInt8] = []
        b.phys.read(pfn, offset: 7, count: 1, into: &seen)
        #expect(seen == [0], "a write to one snapshot's page must not reach another's")
        b.phys.write(pfn, offset: 7, [1][...])
        #expect(a == b && a.hashValue == b.hashValue)
    }

    @Test func badSchedulesEndWithANote() throws {
        let e = try Self.explorer(.punch, .mainline)
        #expect(Schedule(parsing: "0.x") == nil)
        let r = e.replay(Schedule([1, 1]))
        #expect(r.trace.last?.actor == "schedule")
    }
}

/// `gmem explore`'s files: setup steps, then actors whose programs are interleaved.
@Suite("Explore files")
struct ExploreFileTests {
    /// Every race file in scenarios/explore.
    static let files = scenarioFiles(repositoryRoot + "/scenarios/explore").map {
        String($0.split(separator: "/").last!.dropLast(".json".count))
    }
    /// The interleaving-only mutant each of these files exists to catch, and the schedule that shows it.
    static let catches: [String: (Mutant, Schedule)] = [
        "fault-vs-punch": (.skipFaultRetry, Schedule([0, 1, 0])),
        "fault-vs-to-shared": (.skipFaultRetry, Schedule([0, 1, 0])),
        // Needs each path to keep its own handle names: a close on one path must not
        // make the name unknown on the next. The close is fput then release.
        "fault-vs-release": (.skipFaultRetry, Schedule([0, 1, 1, 0])),
        // The deletion is two steps (mark invalid; wait for SRCU, flush, free): the
        // mutant frees the slot while the fault is in flight.
        "fault-vs-memslot-delete": (.memslotDeleteSkipsSRCUWait, Schedule([0, 1, 1, 0])),
        "gup-fast-vs-to-private": (.gupFastSkipRecheck, Schedule([0, 1, 1, 0, 0])),
        "host-fault-vs-to-private": (.conversionDropsInvalidateLock, Schedule([1, 0, 1])),
        // The memslot goes (both steps of its deletion) between the last fput and
        // kvm_gmem_release().
        "release-vs-unbind": (.unbindSkipsDyingFile, Schedule([0, 1, 1])),
        // The conversion runs whole between the map's check and its install.
        "iommu-map-vs-to-private": (.iommuMapDropsInvalidateLock, Schedule([0, 1, 1, 0])),
    ]

    static func scenario(_ name: String) throws -> Scenario {
        let path = repositoryRoot + "/scenarios/explore/\(name).json"
        return try ScenarioParser.parse(text: try #require(readFile(path)), file: path)
    }

    static func runner(_ name: String, _ mutants: Set<Mutant> = []) throws -> ExploreRunner {
        var config = ModelConfig.mainline
        config.mutants = mutants
        let r = ExploreRunner(try scenario(name), config: config)
        #expect(r.setupFailures.isEmpty)
        return r
    }

    @Test("the shipped model: no violation under preemption bound 2", arguments: files)
    func shippedModel(_ name: String) throws {
        let s = try Self.runner(name).explorer.exhaustive(preemptionBound: 2)
        #expect(s.counterexample == nil)
        #expect(s.schedules >= 2, "the other actor before, inside or after the split operation's window")
    }

    @Test("each interleaving-only mutant is caught with a replayable schedule", arguments: catches.keys.sorted())
    func mutantCaught(_ name: String) throws {
        let (mutant, schedule) = try #require(Self.catches[name])
        let e = try Self.runner(name, [mutant]).explorer
        let c = try #require(e.exhaustive(preemptionBound: 2).counterexample)
        #expect(c.schedule == schedule)
        #expect(e.replay(c.schedule).violations == c.violations)
    }

    @Test("PCT finds each mutant too, the same way for the same seed", arguments: catches.keys.sorted())
    func pctFindsTheMutant(_ name: String) throws {
        let (mutant, schedule) = try #require(Self.catches[name])
        let e = try Self.runner(name, [mutant]).explorer
        let a = e.pct(seed: 11, depth: 2, count: 500), b = e.pct(seed: 11, depth: 2, count: 500)
        #expect(a.counterexample?.schedule == schedule)
        #expect(a.schedules == b.schedules && a.steps == b.steps)
        let clean = try Self.runner(name).explorer.pct(seed: 11, depth: 2, count: 200)
        #expect(clean.counterexample == nil && clean.schedules == 200)
    }

    /// The conversion holds filemap_invalidate_lock from its check to its flip: a host
    /// fault in between waits, then finds the page private (SIGBUS).
    @Test func aHostFaultWaitsForTheConversion() throws {
        let e = try Self.runner("host-fault-vs-to-private").explorer
        let blocked = e.replay(Schedule([1, 0]))
        #expect(blocked.trace.last?.saw == "blocked: cannot run here")
        let after = e.replay(Schedule([1, 1, 0]))
        #expect(after.violations.isEmpty)
        #expect(after.trace.last?.saw.hasPrefix("SIGBUS") == true, "\(after.trace)")
    }

    /// Each mutant a file lists in "catches" is found, and its schedule replays to the
    /// same violations.
    @Test("every mutant a file lists is caught, replayably", arguments: files)
    func listedMutantsCaught(_ name: String) throws {
        let s = try Self.scenario(name)
        #expect(!s.catches.isEmpty)
        for r in MutantSweep.run([s]) {
            let schedule = try #require(r.schedule, "\(r.mutant.rawValue) went unnoticed in \(name)")
            var config = ModelConfig.mainline
            config.mutants = [r.mutant]
            #expect(ExploreRunner(s, config: config).explorer.replay(schedule).violations.first == r.violation)
        }
    }

    /// The explorer is shown to catch every mutant: each is listed by some race file.
    @Test func everyMutantHasARaceFile() throws {
        let scenarios = try Self.files.map(Self.scenario)
        #expect(MutantSweep.uncovered(scenarios) == [])
        #expect(Set(Self.catches.values.map(\.0)) == Set(Mutant.allCases.filter(\.needsInterleaving)))
    }

    /// Pin first, and the conversion sees the pin: EAGAIN, nothing private is pinned.
    @Test func aPinThatWinsMakesTheConversionFail() throws {
        let e = try Self.runner("gup-fast-vs-to-private").explorer
        let r = e.replay(Schedule([0, 0, 0, 1]))
        #expect(r.violations.isEmpty)
        #expect(r.trace.last?.saw.hasPrefix("EAGAIN") == true, "\(r.trace)")
        // The conversion unmaps between walk and grab: the recheck lets go, and the
        // slow path waits for the conversion, then cannot fault a private page in.
        let late = e.replay(Schedule([0, 1, 0, 0]))
        #expect(late.trace.last?.saw == "PTE changed: unpinned; slow path")
        #expect(e.replay(Schedule([0, 1, 0, 0, 0])).trace.last?.saw == "blocked: cannot run here")
        let slow = e.replay(Schedule([0, 1, 0, 0, 1, 0]))
        #expect(slow.violations.isEmpty)
        #expect(slow.trace.last?.saw.hasPrefix("EFAULT") == true, "\(slow.trace)")
    }

    /// fork between GUP-fast's walk and its grab write-protects the page: the recheck
    /// lets go, the slow path breaks COW and pins the parent's own copy, and the
    /// parent's write lands on the pinned page.
    @Test func forkDuringGUPFastPinsTheParentsCopy() throws {
        let e = try Self.runner("gup-fast-vs-fork").explorer
        let r = e.replay(Schedule([0, 1, 0, 0, 0, 0]))
        #expect(r.violations.isEmpty)
        #expect(r.trace.map(\.saw)[3] == "PTE changed: unpinned; slow path")
        #expect(r.trace.map(\.saw)[4].hasPrefix("faulted in and pinned"))
        // fork first: the PTE is write-protected, GUP-fast goes straight to the slow path.
        #expect(e.replay(Schedule([1, 0])).trace.last?.saw == "no writable PTE: fall back to the slow path")
    }

    /// Between the last fput and kvm_gmem_release() the file is dying: a fault through
    /// its memslot is EFAULT, and deleting the memslot still removes the binding.
    @Test func aDyingFileFailsFaultsAndLosesItsBindings() throws {
        let e = try Self.runner("release-vs-unbind").explorer
        let fault = e.replay(Schedule([0, 2]))
        #expect(fault.trace.last?.saw.contains("EFAULT") == true, "\(fault.trace)")
        let r = e.replay(Schedule([0, 1, 0]))
        #expect(r.violations.isEmpty && r.trace.count == 3)
    }

    /// A memslot deletion waits (synchronize_srcu) for a fault in flight that looked
    /// its slot up, and a fault that finds the slot invalid retries until it is gone.
    @Test func memslotDeletionAndFaultsWaitForEachOther() throws {
        let e = try Self.runner("fault-vs-memslot-delete").explorer
        #expect(e.replay(Schedule([0, 1, 1])).trace.last?.saw == "blocked: cannot run here", "SRCU: the fault is in flight")
        #expect(e.replay(Schedule([1, 0])).trace.last?.saw == "blocked: cannot run here", "the slot is invalid: the fault retries")
        let r = e.replay(Schedule([0, 1, 0, 1]))
        #expect(r.violations.isEmpty && r.trace.last?.saw == "deleted; slots_lock released", "\(r.trace)")
        let after = e.replay(Schedule([1, 1, 0]))
        #expect(after.trace.last?.saw.contains("KVM_EXIT_MEMORY_FAULT") == true, "no memslot: a private access exits, \(after.trace)")
    }

    /// A hypervisor IOMMU map holds filemap_invalidate_lock shared from its check to
    /// its install: the conversion waits; and an SVA DMA that must fault waits for a
    /// conversion holding it.
    @Test func devicePathsAndConversionsExcludeEachOther() throws {
        let map = try Self.runner("iommu-map-vs-to-private").explorer
        #expect(map.replay(Schedule([0, 1])).trace.last?.saw == "blocked: cannot run here")
        #expect(map.replay(Schedule([0, 0, 1])).trace.last?.saw.hasPrefix("EAGAIN") == true)
        #expect(map.replay(Schedule([1, 1, 0])).trace.last?.saw == "EPERM")
        // VFIO's map pins by slow GUP, which faults: the explorer learns it would sleep
        // by trying it on a copy, and runs it after the flip, when it finds the page private.
        let vfio = try Self.runner("vfio-map-vs-to-private").explorer
        #expect(vfio.replay(Schedule([1, 0])).trace.last?.saw == "blocked: cannot run here")
        #expect(vfio.replay(Schedule([1, 1, 0])).trace.last?.saw == "EFAULT")
        let sva = try Self.runner("sva-dma-vs-to-private").explorer
        #expect(sva.replay(Schedule([1, 0])).trace.last?.saw == "blocked: cannot run here")
        #expect(sva.replay(Schedule([1, 1, 0])).trace.last?.saw.contains("EFAULT") == true)
    }

    /// A map holds its file for the length of the call (fdget): a close in the middle
    /// is not the last reference, and the release comes when the map returns, taking
    /// the IOMMU's entries with the pages.
    @Test func aCallHoldsItsFile() throws {
        let e = try Self.runner("iommu-map-vs-close").explorer
        let r = e.replay(Schedule([0, 2, 0, 0]))
        #expect(r.violations.isEmpty)
        #expect(r.trace.map(\.saw)[1] == "closed", "\(r.trace)")
        #expect(r.trace.last?.saw.contains("EFAULT") == true, "\(r.trace)")
    }

    /// The conformance corpus under the explorer: a file without actors runs its
    /// steps as one actor, with the state and transition invariants checked after
    /// every step (a sequential run checks them only at check_invariants steps).
    @Test("the scenario corpus holds every invariant after every step", arguments: ScenarioTests.corpus)
    func corpusUnderTheExplorer(_ path: String) throws {
        let s = try ScenarioParser.parse(text: try #require(readFile(path)), file: path)
        var config = ModelConfig.mainline
        if s.requires.contains(.noDirectMap) { config = .next }
        let r = ExploreRunner(s, config: config)
        #expect(r.skipReason == nil)
        let summary = r.explorer.exhaustive(preemptionBound: 2)
        #expect(summary.counterexample == nil, "\(summary.counterexample.map { "\($0.schedule): \($0.violations)" } ?? "")")
        #expect(summary.schedules == 1 && r.explorer.actors.count == 1)
    }

    /// A long program is not a livelock: the step bound grows with the programs.
    @Test func longActorsAreNotLivelocks() throws {
        let step = #"{"op": "check_extension", "cap": "guest_memfd"}"#
        let program = Array(repeating: step, count: 1_500).joined(separator: ", ")
        let text = #"{"name": "long", "steps": [], "actors": [{"name": "a", "program": ["# + program + #"]}, {"name": "b", "program": ["# + step + #"]}]}"#
        let r = ExploreRunner(try ScenarioParser.parse(text: text, file: "long"), config: .mainline)
        let summary = r.explorer.exhaustive(preemptionBound: 1)
        #expect(summary.counterexample == nil, "\(summary.counterexample.map { "livelock: \($0.livelock)" } ?? "")")
        #expect(summary.schedules > 1)
    }

    /// `gmem explore --mutants --json` lines: valid JSON that says what was caught, how.
    @Test func mutantResultsAsJSON() throws {
        let s = try Self.scenario("release-vs-unbind")
        let line = try #require(MutantSweep.run([s]).first).json.rendered
        let parsed = try JSONParser.parse(line)
        #expect(parsed["mutant"] == .string("unbind-skips-dying-file"))
        #expect(parsed["caught"] == .bool(true))
        #expect(parsed["schedule"] == .string("0.1.1"))
        #expect(parsed["violation"]?["invariant"] == .string("lifetime"))
        #expect(format6(0.0034271) == "0.003427" && format6(12.5) == "12.500000")
    }

    /// The incremental invariant check gives the full check's answer on every edge
    /// the explorer takes, in every race file, on the shipped model and under every
    /// mutant the file catches (where the answers are violations).
    @Test("the incremental invariant check agrees with the full one", arguments: files)
    func incrementalCheckAgrees(_ name: String) throws {
        let s = try Self.scenario(name)
        final class Tally: @unchecked Sendable { var edges = 0, shortcuts = 0, mismatches: [String] = [] }
        let tally = Tally()
        for mutants in [[]] + s.catches.map({ [$0] }) {
            var e = try Self.runner(name, Set(mutants)).explorer
            e.invariantCheck = { q, p in
                let full = q.checkSystemInvariants()
                let incremental = q.checkSystemInvariants(since: p)
                tally.edges += 1
                if q.sameOutsidePages(as: p) { tally.shortcuts += 1 }
                if incremental != full { tally.mismatches.append("\(mutants): \(incremental) vs \(full)") }
                return full
            }
            _ = e.exhaustive(preemptionBound: 2)
        }
        #expect(tally.mismatches.isEmpty, "\(tally.mismatches.prefix(3))")
        #expect(tally.edges > 0)
        if name.hasPrefix("fault-vs") || name == "conversion-storm" { #expect(tally.shortcuts > 0, "the shortcut is exercised") }
    }

    @Test func catchesNamesKnownMutants() {
        let text = #"{"name": "x", "catches": ["skip-fault-retry", "no-such-bug"], "steps": []}"#
        #expect {
            _ = try ScenarioParser.parse(text: text, file: "f.json")
        } throws: { "\($0)".contains("f.json: field 'catches': unknown mutant \"no-such-bug\"") }
    }

    @Test("bad actor programs name the file, step and field", arguments: [
        (#"{"name": "x", "steps": [], "actors": [{"name": "a", "program": [{"op": "guest_fault", "gpa": 1}]}]}"#, "field 'vcpu'"),
        (#"{"name": "x", "steps": [], "actors": [{"name": "a", "program": [{"op": "guest_fault", "vcpu": "v", "gpa": 1}]}]}"#, "unknown handle name 'v'"),
        (#"{"name": "x", "steps": [], "actors": [{"name": "a"}]}"#, "field 'actors[0]'"),
        (#"{"name": "x", "steps": [], "actors": {}}"#, "field 'actors'"),
        (#"{"name": "x", "steps": [{"op": "create_vm", "as": "vm"}], "actors": [{"name": "a", "program": [{"op": "create_vcpu", "vm": "vm", "as": "v"}, {"op": "guest_fault", "vcpu": "v", "gpa": 1, "speed": 2}]}]}"#, "step 2 (guest_fault): field 'speed'"),
    ])
    func badFiles(_ text: String, _ says: String) {
        #expect(throws: ScenarioError.self) { _ = try ScenarioParser.parse(text: text, file: "f.json") }
        do {
            _ = try ScenarioParser.parse(text: text, file: "f.json")
        } catch {
            #expect("\(error)".contains("f.json") && "\(error)".contains(says), "\(error)")
        }
    }
}

/// The incremental invariant check against the full one on steps built by hand to
/// break each invariant in a way only the step's own changes show: the shortcut must
/// find each and report what the full check reports.
@Suite("Incremental invariants")
struct IncrementalInvariantTests {
    static let gpa: UInt64 = 1 << 30

    /// A sw_protected VM with two memslots: slot 0 private (guest_memfd, page 0
    /// faulted in privately), slot 1 shared memory from a memfd mapping (page 0
    /// faulted in); every invariant holds.
    static func world() throws -> (Kernel, vm: UInt64, ino: UInt64, vpn: UInt64) {
        var k = Kernel()
        let vmFD = try k.createVM(type: VMType.swProtected.number)
        let gmem = try k.createGuestMemfd(on: vmFD, size: 16384, flags: 0)
        try k.setUserMemoryRegion2(vm: vmFD, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: gpa, memorySize: 16384, userspaceAddr: 0, guestMemfd: UInt32(gmem)))
        _ = try k.setMemoryAttributes(vm: vmFD, address: gpa, size: 16384, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        let shm = try k.memfdCreate(size: 16384)
        let map = try k.mmap(fd: shm, offset: 0, length: 16384, prot: [.read, .write], shared: true)
        try k.setUserMemoryRegion2(vm: vmFD, UserMemoryRegion2(
            slot: 1, flags: 0, guestPhysAddr: 2 * gpa, memorySize: 16384, userspaceAddr: map.address))
        let vcpu = try k.createVCPU(vm: vmFD, id: 0)
        _ = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: .write([1])))
        _ = try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 2 * gpa, kind: .write([2])))
        #expect(k.checkSystemInvariants().isEmpty)
        let vm = try k.vmFD(vmFD)
        let ino = try #require(k.gmemInodes.keys.first)
        return (k, vm, ino, map.address >> 12)
    }

    static func agree(_ parent: Kernel, _ child: Kernel) -> (full: [Violation], shortcut: Bool, same: Bool) {
        let full = child.checkSystemInvariants()
        return (full, child.sameOutsidePages(as: parent), child.checkSystemInvariants(since: parent) == full)
    }

    @Test func aPTEChangeBehindASharedMemslotIsSeen() throws {
        let (k, _, _, vpn) = try Self.world()
        var child = k
        let other = child.phys.allocate()
        child.processes[1]!.mm.ptes[vpn]!.pfn = other  // the SPTE at 2 GiB is now stale
        let r = Self.agree(k, child)
        #expect(r.shortcut && r.same && r.full.contains { $0.invariant == .coherence })
    }

    @Test func aPageCacheChangeUnderAnSPTEIsSeen() throws {
        let (k, _, ino, _) = try Self.world()
        var child = k
        let fresh = child.phys.allocate()
        child.gmemInodes[ino]!.folios[0] = fresh  // the private SPTE at 1 GiB is now stale
        let r = Self.agree(k, child)
        #expect(r.shortcut && r.same && r.full.contains { $0.invariant == .coherence })
    }

    @Test func aNewPTEOnAPrivatePageIsSeen() throws {
        let (k, _, ino, _) = try Self.world()
        var child = k
        let pfn = try #require(child.gmemInodes[ino]!.folios[0])
        child.processes[1]!.mm.ptes[0x1234] = PTE(pfn: pfn, writable: true)
        let r = Self.agree(k, child)
        #expect(r.shortcut && r.same && r.full.contains { $0.invariant == .isolation })
    }

    @Test func aNewSPTEOfAnotherVMOnAPrivatePageIsSeen() throws {
        var (k, _, ino, _) = try Self.world()
        let otherFD = try k.createVM(type: VMType.swProtected.number)
        let other = try k.vmFD(otherFD)
        var child = k
        let pfn = try #require(child.gmemInodes[ino]!.folios[0])
        child.vms[other]!.spte[0x40000] = SPTE(pfn: pfn, isPrivate: true, writable: true)
        let r = Self.agree(k, child)
        #expect(r.shortcut && r.same && r.full.contains { $0.invariant == .isolation })
    }

    @Test func aPageCacheEntryNamingAnOlderFrameFallsBackToTheFullCheck() throws {
        let (k, _, ino, vpn) = try Self.world()
        var child = k
        let shared = try #require(child.processes[1]!.mm.ptes[vpn]?.pfn)
        child.gmemInodes[ino]!.folios[1] = shared  // a frame the host maps becomes a private page
        let r = Self.agree(k, child)
        #expect(r.shortcut && r.same && r.full.contains { $0.invariant == .isolation })
    }
}

/// The transition check looks only at pages whose page-cache entry or frame changed;
/// this is the plain walk over every page it replaced, as an oracle.
func referenceTransitionViolations(before: Kernel, after: Kernel, effect: ContentEffect) -> [Violation] {
    var out: [Violation] = []
    func page(_ ino: UInt64, _ pgoff: UInt64) -> String { "guest_memfd inode \(ino) offset 0x\(String(pgoff << 12, radix: 16))" }
    for (ino, new) in after.gmemInodes.sorted(by: { $0.key < $1.key }) {
        guard let old = before.gmemInodes[ino] else { continue }
        let lossy = new.files.compactMap { after.gmemFiles[$0]?.vm ?? nil }.contains { after.vms[$0]?.type.conversionIsLossy == true }
        for (pgoff, pfn) in new.folios {
            let data = after.phys.frames[pfn]?.data
            if new.inPlace, old.privatePages.value(at: pgoff), !new.privatePages.value(at: pgoff), lossy, data?.contains(where: { $0 != 0 }) == true {
                out.append(Violation(invariant: .noLeak, page: page(ino, pgoff), parties: ["host (now shared)"],
                    detail: "private contents became visible to the host on a platform that does not preserve them"))
            }
            if effect == .preserving, let oldPFN = old.folios[pgoff], !(lossy && old.privatePages.value(at: pgoff) != new.privatePages.value(at: pgoff)) {
                let oldData = before.phys.frames[oldPFN]?.data
                if oldData != data && !(oldData == nil && data?.allSatisfy({ $0 == 0 }) == true) {
                    out.append(Violation(invariant: .noLoss, page: page(ino, pgoff), parties: ["guest_memfd"], detail: "a call that preserves contents changed them"))
                }
            }
        }
        if effect == .preserving {
            for (pgoff, oldPFN) in old.folios where new.folios[pgoff] == nil {
                if before.phys.frames[oldPFN]?.data?.contains(where: { $0 != 0 }) == true {
                    out.append(Violation(invariant: .noLoss, page: page(ino, pgoff), parties: ["guest_memfd"], detail: "a call that preserves contents dropped a page holding data"))
                }
            }
        }
    }
    return out
}

extension ExploreFileTests {
    /// On every new state of every race file (shipped model and each mutant the file
    /// catches), the transition check agrees with the plain walk over every page.
    @Test("the transition check agrees with a walk over every page", arguments: files)
    func transitionCheckAgrees(_ name: String) throws {
        let s = try Self.scenario(name)
        final class Tally: @unchecked Sendable { var mismatches: [String] = [] }
        let tally = Tally()
        for mutants in [[]] + s.catches.map({ [$0] }) {
            var e = try Self.runner(name, Set(mutants)).explorer
            e.invariantCheck = { q, p in
                for effect in [ContentEffect.preserving, .writes] {
                    // (pKVM's part is shared by both, so only guest_memfd pages are compared.)
                    let fast = Kernel.transitionViolations(before: p, after: q, effect: effect, diffAbove: 0).filter { $0.page.hasPrefix("guest_memfd") }
                    let slow = referenceTransitionViolations(before: p, after: q, effect: effect)
                    if fast != slow { tally.mismatches.append("\(mutants) \(effect): \(fast) vs \(slow)") }
                }
                return q.checkSystemInvariants(since: p)
            }
            _ = e.exhaustive(preemptionBound: 2)
        }
        #expect(tally.mismatches.isEmpty, "\(tally.mismatches.prefix(2))")
    }
}
