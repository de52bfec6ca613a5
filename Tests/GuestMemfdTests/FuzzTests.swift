import GMemBackend
import GMemModel
import GMemScenario
import Testing

#if os(Linux)
import GMemKernel
#endif

/// Runs scenario steps given as JSON text on a fresh model; the reports in order.
func runSteps(_ steps: String, config: ModelConfig = .mainline) throws -> [StepReport] {
    let scenario = try ScenarioParser.parse(text: "{\"name\": \"t\", \"steps\": [\(steps)]}", file: "test")
    var reports: [StepReport] = []
    _ = ScenarioRunner(backend: ModelBackend(config: config, checkTransitions: true)).run(scenario) { reports.append($0) }
    return reports
}

@Suite("Fuzzing")
struct FuzzTests {
    /// The model alone under random sequences: no trap, no invariant violation
    /// (the known kernel hazards aside), every sequence reproducible from its seed.
    @Test func modelCampaignFindsNothing() throws {
        let campaign = FuzzCampaign { () throws(BackendError) -> [any Backend] in [ModelBackend(checkTransitions: true)] }
        for i in 0..<150 {
            let seed = FuzzRNG.sequenceSeed(campaign: 7, index: i)
            let steps = FuzzGenerator.sequence(seed: seed, steps: 30, scope: .modelOnly)
            #expect(steps == FuzzGenerator.sequence(seed: seed, steps: 30, scope: .modelOnly))
            if let f = try campaign.run(steps) {
                #expect(f.known != nil, "sequence \(seed): \(f.signature): \(f.first)")
            }
        }
        #expect(campaign.stepsCompared > 2000)
    }

    /// Shrinking keeps the finding and drops what does not matter to it: a mutant's
    /// violation in a padded sequence shrinks to the steps that show it.
    @Test func minimizationKeepsTheFinding() throws {
        var config = ModelConfig.mainline
        config.mutants = [.skipPunchZap]
        let campaign = FuzzCampaign { () throws(BackendError) -> [any Backend] in [ModelBackend(config: config, checkTransitions: true)] }
        let text = """
            {"name": "t", "steps": [
             {"op": "create_vm", "as": "vm", "expect": "any"},
             {"op": "memfd_create", "size": "16K", "as": "noise", "expect": "any"},
             {"op": "create_guest_memfd", "vm": "vm", "size": "2M", "flags": ["mmap", "init_shared"], "as": "g", "expect": "any"},
             {"op": "fstat", "fd": "noise", "expect": "any"},
             {"op": "set_user_memory_region2", "vm": "vm", "slot": 0, "flags": ["guest_memfd"], "gpa": "1G", "size": "2M", "guest_memfd": "g", "expect": "any"},
             {"op": "write", "fd": "noise", "bytes": "aa", "expect": "any"},
             {"op": "guest_write", "vm": "vm", "gpa": "1G", "bytes": "55", "expect": "any"},
             {"op": "fallocate", "fd": "g", "mode": ["keep_size", "punch_hole"], "offset": 0, "len": "4K", "expect": "any"},
             {"op": "fstat", "fd": "g", "expect": "any"}
            ]}
            """
        guard case .array(let steps)? = try JSONParser.parse(text)["steps"] else { Issue.record("no steps"); return }
        let found = try #require(try campaign.run(steps))
        let small = campaign.minimize(found)
        #expect(small.signature == found.signature)
        #expect(small.steps.count == 5, "kept: \(small.steps.map(\.rendered))")
        #expect(!small.steps.contains { $0["op"] == .string("memfd_create") })
    }

    /// Number expressions from hostile files: never a trap or a deep recursion.
    @Test(arguments: [
        "4ß", "4ẞ", "1ﬀ", String(repeating: "-", count: 100_000) + "1", String(repeating: "2^", count: 5000) + "2",
        String(repeating: "9", count: 10_000), "0x" + String(repeating: "f", count: 40), "2^2^2", "٣", "1" + String(repeating: "+1", count: 200),
    ])
    func hostileNumbersAreRefused(_ text: String) {
        _ = NumberSyntax.parse(text)
        _ = NumberSyntax.parse(.string(text))
    }

    @Test func numberSyntaxStillReadsTheCorpusForms() {
        let top: UInt64 = (1 << 63) - 4096
        let minus: UInt64 = 0 &- 4096
        #expect(NumberSyntax.parse("2^63-4K") == top)
        #expect(NumberSyntax.parse("--4096") == UInt64(4096))
        #expect(NumberSyntax.parse("-4096") == minus)
        #expect(NumberSyntax.parse("4k") == UInt64(4096))
        #expect(NumberSyntax.parse("2^2^2") == nil)
    }

    /// The hostile-input table (docs/fuzzing.md): each input class, what the model now
    /// does. Each runs in far under a second; none traps or allocates its range.
    @Test(arguments: [
        // memfd fallocate, punch and truncate over 128 TiB: ranges, not pages
        (#"{"op": "memfd_create", "size": "16K", "as": "m"}, {"op": "fallocate", "fd": "m", "mode": ["keep_size"], "offset": 0, "len": "2^47"}, {"op": "fallocate", "fd": "m", "mode": ["keep_size", "punch_hole"], "offset": 0, "len": "2^62"}, {"op": "ftruncate", "fd": "m", "size": 0}, {"op": "fstat", "fd": "m", "expect_value": {"blocks": 0}}"#, "ok"),
        // memfd read of a huge count: EFAULT (no buffer that large), then clipped to EOF
        (#"{"op": "memfd_create", "size": "16K", "as": "m"}, {"op": "pread", "fd": "m", "len": "2^63", "expect": "EFAULT"}, {"op": "pread", "fd": "m", "len": "2^40", "expect_value": {"len": 16384}}"#, "ok"),
        // pread past LLONG_MAX: EINVAL
        (#"{"op": "memfd_create", "size": "16K", "as": "m"}, {"op": "pread", "fd": "m", "len": "8K", "offset": "2^63-4K", "expect": "EINVAL"}"#, "ok"),
        // host read near 2^63 bytes: refused by the transfer limit, not attempted
        (#"{"op": "mmap", "len": "16K", "shared": false, "as": "a"}, {"op": "host_read", "map": "a", "len": "2^63-1"}"#, "skipped"),
        // a 64 GiB host read: refused by the transfer limit
        (#"{"op": "mmap", "len": "16K", "shared": false, "as": "a"}, {"op": "host_read", "map": "a", "len": "64G"}"#, "skipped"),
        // pinning 2^46 bytes of anonymous memory: refused by the GUP bound
        (#"{"op": "mmap", "len": "2^46", "shared": false, "as": "a"}, {"op": "pin", "map": "a", "len": "2^46", "as": "p"}"#, "skipped"),
        // a GUP-fast offset that wraps below the mapping: EFAULT (nothing mapped there), no trap
        (#"{"op": "mmap", "len": "16K", "shared": false, "as": "a"}, {"op": "gup_fast", "map": "a", "offset": "-4K", "len": "8K", "expect": "EFAULT"}"#, "ok"),
        // IOMMU unmap over 2^63 bytes: the entries present, not the pages
        (#"{"op": "iommu_domain", "model": "vfio", "as": "d"}, {"op": "iommu_unmap", "domain": "d", "iova": 0, "len": "2^63"}"#, "ok"),
        // a DMA read of 64 GiB: refused by the transfer limit
        (#"{"op": "iommu_domain", "model": "vfio", "as": "d"}, {"op": "dma_read", "domain": "d", "iova": 0, "len": "64G"}"#, "skipped"),
        // a guest read of 2^62 bytes: refused by the transfer limit
        (#"{"op": "create_vm", "as": "vm"}, {"op": "guest_read", "vm": "vm", "gpa": "1G", "len": "2^62"}"#, "skipped"),
    ])
    func hostileInputCostsWhatItTouches(_ steps: String, _ last: String) throws {
        let reports = try runSteps(steps)
        for r in reports.dropLast() { #expect(r.status == .passed, "step \(r.index) \(r.op): \(r.message ?? "")") }
        let end = try #require(reports.last)
        #expect(end.status.rawValue == (last == "ok" ? "passed" : last), "\(end.op): \(end.message ?? "")")
        if last == "skipped" { #expect(end.message?.contains("limit") == true) }
    }

    /// VFIO type1 v2 refuses an unmap that splits a mapping; whole mappings unmap.
    @Test func vfioRefusesSplittingUnmap() throws {
        let reports = try runSteps("""
            {"op": "mmap", "len": "16K", "shared": false, "as": "a"},
            {"op": "iommu_domain", "model": "vfio", "as": "d"},
            {"op": "iommu_map", "domain": "d", "iova": "1M", "map": "a", "len": "16K"},
            {"op": "iommu_unmap", "domain": "d", "iova": "1M", "len": "4K", "expect": "EINVAL"},
            {"op": "iommu_unmap", "domain": "d", "iova": "1M+4K", "len": "12K", "expect": "EINVAL"},
            {"op": "dma_read", "domain": "d", "iova": "1M+8K", "len": 1, "expect_bytes": "00"},
            {"op": "iommu_unmap", "domain": "d", "iova": "1M", "len": "16K"},
            {"op": "dma_read", "domain": "d", "iova": "1M+8K", "len": 1, "expect": "EFAULT"}
            """)
        for r in reports { #expect(r.status == .passed, "step \(r.index) \(r.op): \(r.message ?? "")") }
    }

    /// Mutational fuzzing of the scenario parser: every corpus file with random byte
    /// edits either parses or is refused with a message; nothing traps.
    @Test func mutatedScenarioFilesNeverTrap() {
        var rng = FuzzRNG(seed: 42)
        let files = ScenarioTests.corpus.prefix(12)
        var refused = 0
        for path in files {
            guard let text = readFile(path) else { continue }
            var bytes = Array(text.utf8)
            for _ in 0..<25 {
                var mutated = bytes
                for _ in 0..<(1 + rng.next() % 4) {
                    let at = Int(rng.next() % UInt64(max(mutated.count, 1)))
                    switch rng.next() % 4 {
                    case 0: mutated[at] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: mutated.remove(at: at)
                    case 2: mutated.insert(contentsOf: Array("\"2^63\"".utf8), at: at)
                    default: mutated.insert(contentsOf: Array(String(repeating: "[", count: 300).utf8), at: at)
                    }
                }
                do {
                    _ = try ScenarioParser.parse(text: String(decoding: mutated, as: UTF8.self), file: path)
                } catch {
                    refused += 1
                    #expect(!error.description.isEmpty)
                }
            }
            bytes.removeAll()
        }
        #expect(refused > 0)
    }

    #if os(Linux)
    /// The kernel backend refuses, before the call, what would pass its memory budget,
    /// and unmaps what a run left mapped when it goes.
    @Test(.enabled(if: KernelBackend.unavailableReason() == nil, "needs a usable /dev/kvm"))
    func kernelBudgetRefusesHugeAllocations() throws {
        let k = try KernelBackend()
        k.budget = MemoryBudget(limit: 1 << 20)
        let vm = try k.createVM(type: 0)
        let gmem = try k.createGuestMemfd(on: vm, size: 1 << 40, flags: 3)
        #expect(throws: BackendError.self) { try k.fallocate(gmem, mode: KEEP, offset: 0, length: 1 << 30) }
        // guest_memfd refuses this range before allocating, so it is not charged.
        #expect(throws: BackendError.errno(.EINVAL)) { try k.fallocate(gmem, mode: KEEP, offset: 1 << 40, length: 1 << 30) }
        try k.fallocate(gmem, mode: KEEP, offset: 0, length: 1 << 16)
        do {
            try k.fallocate(gmem, mode: KEEP, offset: 0, length: 1 << 21)
            Issue.record("a fallocate over the budget ran")
        } catch {
            guard case .unsupported(let why) = error else { Issue.record("\(error)"); return }
            #expect(why.contains("--memory-budget"))
        }
    }
    #endif
}
