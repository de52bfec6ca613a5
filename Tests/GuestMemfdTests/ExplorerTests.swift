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
            ExploreStep("guest write") { w, _ in
                let o = try? w.kernel.guestAccess(vcpu: fd, GuestAccess(gpa: gpa, kind: .write([0x5a])))
                return StepResult("\(o.map { "\($0)" } ?? "error")")
            },
        ])
    }

    static func punch(_ gmem: Int32) -> ExploreActor {
        ExploreActor("vmm", [
            ExploreStep("fallocate(PUNCH_HOLE) page 0") { w, _ in
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
        #expect(k.hostFaultWouldBlock(address: map.address, write: false), "page 0 was unmapped: its fault waits")
        #expect(!k.hostFaultWouldBlock(address: map.address + 4096, write: true), "page 1 is mapped writable: no fault")
        k.commitToPrivate(p)
        #expect(!k.hostFaultWouldBlock(address: map.address, write: false), "the lock is released")
    }

    /// GUP-fast's grab is folio_try_get(): a folio freed since the walk is not pinned.
    @Test func gupFastDoesNotPinAFreedFolio() throws {
        var k = Kernel()
        let vm = try k.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try k.createGuestMemfd(on: vm, size: 4096, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try k.mmap(fd: gmem, offset: 0, length: 4096, prot: [.read, .write], shared: true)
        _ = k.setGuestMemfdAttributes(gmem, offset: 0, size: 4096, attributes: 0, flags: 0)
        #expect(k.hostAccess(address: map.address, count: 1, write: [1]) == .completed([]))
        var live = try #require(k.gupFastWalk(address: map.address))
        let pinned = k.gupFastGrab(&live)
        #expect(pinned, "the folio is live: pinned")
        #expect(k.gupFastRecheck(live) != nil)
        try k.unpin(#require(k.pins.keys.first))

        var stale = try #require(k.gupFastWalk(address: map.address))
        try k.fallocate(gmem, mode: UAPI.FALLOC_FL_PUNCH_HOLE | UAPI.FALLOC_FL_KEEP_SIZE, offset: 0, length: 4096)
        let grabbed = k.gupFastGrab(&stale)
        #expect(!grabbed, "punched and unmapped since the walk: the folio is gone")
        #expect(k.gupFastRecheck(stale) == nil)
    }

    @Test func actorsThatAllWaitAreADeadlock() throws {
        let (w, _, _, _) = try Self.world(.mainline)
        let stuck = ExploreActor("stuck", [ExploreStep("wait forever", blocked: { _ in true }) { _, _ in StepResult("ran") }])
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
    static let files = ["fault-vs-punch", "fault-vs-to-shared", "fault-vs-release", "fault-vs-memslot-delete", "gup-fast-vs-to-private", "host-fault-vs-to-private"]
    /// The interleaving-only mutant each file exists to catch, and the schedule that shows it.
    static let catches: [String: (Mutant, Schedule)] = [
        "fault-vs-punch": (.skipFaultRetry, Schedule([0, 1, 0])),
        "fault-vs-to-shared": (.skipFaultRetry, Schedule([0, 1, 0])),
        // Needs each path to keep its own handle names: a close on one path must not
        // make the name unknown on the next.
        "fault-vs-release": (.skipFaultRetry, Schedule([0, 1, 0])),
        "fault-vs-memslot-delete": (.skipFaultRetry, Schedule([0, 1, 0])),
        "gup-fast-vs-to-private": (.gupFastSkipRecheck, Schedule([0, 1, 1, 0, 0])),
        "host-fault-vs-to-private": (.conversionDropsInvalidateLock, Schedule([1, 0, 1])),
    ]

    static func runner(_ name: String, _ mutants: Set<Mutant> = []) throws -> ExploreRunner {
        let path = repositoryRoot + "/scenarios/explore/\(name).json"
        var config = ModelConfig.mainline
        config.mutants = mutants
        let r = ExploreRunner(try ScenarioParser.parse(text: try #require(readFile(path)), file: path), config: config)
        #expect(r.setupFailures.isEmpty)
        return r
    }

    @Test("the shipped model: no violation under preemption bound 2", arguments: files)
    func shippedModel(_ name: String) throws {
        let s = try Self.runner(name).explorer.exhaustive(preemptionBound: 2)
        #expect(s.counterexample == nil)
        #expect(s.schedules >= 2, "the other actor before, inside or after the split operation's window")
    }

    @Test("each interleaving-only mutant is caught with a replayable schedule", arguments: files)
    func mutantCaught(_ name: String) throws {
        let (mutant, schedule) = try #require(Self.catches[name])
        let e = try Self.runner(name, [mutant]).explorer
        let c = try #require(e.exhaustive(preemptionBound: 2).counterexample)
        #expect(c.schedule == schedule)
        #expect(e.replay(c.schedule).violations == c.violations)
    }

    @Test("PCT finds each mutant too, the same way for the same seed", arguments: files)
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

    /// Mutants a sequential scenario already catches; the race files catch them too,
    /// on the first schedule (no preemption needed).
    @Test("the race files catch sequential mutants too", arguments: [
        ("fault-vs-punch", Mutant.skipPunchZap), ("fault-vs-to-shared", .skipAttributeZap),
        ("fault-vs-release", .releaseWithoutZap), ("gup-fast-vs-to-private", .skipRefcountCheck),
    ])
    func sequentialMutantsToo(_ name: String, _ mutant: Mutant) throws {
        let s = try Self.runner(name, [mutant]).explorer.exhaustive(preemptionBound: 2)
        let c = try #require(s.counterexample)
        #expect(s.schedules == 1)
        #expect(!c.violations.isEmpty)
    }

    @Test func everyInterleavingOnlyMutantHasAFile() {
        let covered = Set(Self.catches.values.map(\.0))
        #expect(covered == Set(Mutant.allCases.filter(\.needsInterleaving)))
    }

    /// Pin first, and the conversion sees the pin: EAGAIN, nothing private is pinned.
    @Test func aPinThatWinsMakesTheConversionFail() throws {
        let e = try Self.runner("gup-fast-vs-to-private").explorer
        let r = e.replay(Schedule([0, 0, 0, 1]))
        #expect(r.violations.isEmpty)
        #expect(r.trace.last?.saw.hasPrefix("EAGAIN") == true, "\(r.trace)")
        let late = e.replay(Schedule([0, 1, 0, 0]))
        #expect(late.trace.last?.saw == "PTE changed: unpinned, GUP-fast fails")
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
