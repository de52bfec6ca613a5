import ArgumentParser
import GMemBackend
import GMemModel
import GMemScenario
import GMemVMM

#if canImport(Glibc)
import Glibc
#endif
#if os(Linux)
import GMemKernel
#endif

/// The main job: a confidential VM's I/O life end to end, told as it happens.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "A VM's I/O life end to end, on the model and (where /dev/kvm opens) on the real kernel (the default).")

    func run() throws {
        emit("""
            GuestMemfd: Linux KVM guest_memfd, executable in user space.

            A confidential VM keeps its memory private; to do I/O it shares a buffer with
            the host, a device writes into it, and the guest takes it back. Below, that
            life runs on the model (every rule of the kernel and of the in-place conversion
            design, checked as it goes), one race in it runs in every interleaving, and
            then, where /dev/kvm opens, the life runs on this machine's real KVM with real
            guest code.

            """)
        var ok = try modelPart()
        ok = racePart() && ok
        kernelPart()
        emit("""

            More: `gmem tour` (guest_memfd's rules, step by step), `gmem run scenarios/`
            (the conformance suite; `--backend both` beside the real kernel), `gmem compare`
            (the design alternatives side by side), `gmem explore scenarios/explore/...` (races,
            every interleaving), `gmem probe` (what this host offers).
            """)
        emit(ok ? "demo: every check held" : "demo: a check failed")
        if !ok { throw ExitCode(1) }
    }

    static let base: UInt64 = 1 << 30
    static let size: UInt64 = 4 << 20
    static let buffer: UInt64 = base + (1 << 20)
    static let bufferPages: UInt64 = 16

    /// Microseconds on the monotonic clock.
    func now() -> Double { monotonicSeconds() * 1e6 }

    func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    /// The model: an sw_protected VM with in-place conversion, a VFIO-style NIC, the
    /// VMM's conversion manager answering the guest's doorbell.
    func modelPart() throws -> Bool {
        emit("== On the model (x86 mainline semantics, in-place conversion, sw_protected VM)")
        let b = ModelBackend(checkTransitions: true)
        var ok = true
        func reach(_ map: Mapping, _ domain: ObjectHandle) -> String {
            let host = (try? b.hostRead(address: map.address + (Self.buffer - Self.base), count: 1)).map {
                if case .completed(let x) = $0 { "reads \(BytesSyntax.hex(x))" } else { "SIGBUS" }
            } ?? "?"
            let device = (try? b.dma(domain: domain, iova: Self.buffer, write: nil, count: 1)).map { "reads \(BytesSyntax.hex($0))" } ?? "IOMMU fault"
            return "host \(host), device \(device)"
        }
        func invariants() {
            let v = (try? b.checkInvariants()) ?? []
            if v.isEmpty {
                emit("     invariants: isolation, coherence, lifetime, no leak, no loss: all hold")
            } else {
                ok = false
                for x in v { emit("     VIOLATION \(x)") }
            }
        }

        let vm = try b.createVM(type: VMType.swProtected.number, conversion: .inPlace)
        let gmem = try b.createGuestMemfd(on: vm, size: Self.size, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try b.mmap(fd: gmem, offset: 0, length: Self.size, prot: [.read, .write], shared: true)
        try b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: Self.base, memorySize: Self.size, userspaceAddr: 0,
            guestMemfd: UInt32(gmem.raw)))
        let vcpu = try b.createVCPU(vm: vm, id: 0)
        let manager = ConversionManager(backend: b, vm: vm, policy: .inPlace,
                                        regions: [ManagedRegion(gpa: Self.base, size: Self.size, gmem: gmem)])
        let handler = GuestRequestHandler(manager: manager)
        let nic = try b.createIOMMUDomain(.vfio, vm: nil)
        try manager.register(IOMMUListener(name: "nic", backend: b, domain: nic, hostAddress: map.address, gpaBase: Self.base))
        emit("   VM: 4 MiB of guest_memfd at gpa \(hex(Self.base)), all private; a NIC behind a VFIO-style IOMMU")

        // Costs are counted, not timed: the model checks every invariant around every call
        // here, which would dominate any time shown (docs/benchmarks.md has the timings).
        var costs: [(String, Stats, Stats, Double)] = []
        func program(_ title: String, _ ops: [GuestProgram.Op]) throws -> GuestProgramResult {
            let r = try b.runGuestProgram(vcpu: vcpu, GuestProgram(ops)) { req in
                let s = b.kernel.stats
                let t = now()
                let answer = handler.handle(req)
                costs.append(("\(req.toPrivate ? "to-private" : "to-shared") of \(req.npages) pages at \(hex(req.gpa))", s, b.kernel.stats, now() - t))
                return answer
            }
            emit("   \(title)")
            for e in r.events { emit("     guest: \(describe(e))") }
            if r.end != .completed([]) { emit("     guest stopped: \(r.end)"); ok = false }
            return r
        }
        func conversionsSoFar() {
            for (what, s0, s1, us) in costs {
                let refused = s1.conversionsRefused > s0.conversionsRefused
                emit("     VMM: \(what) \(refused ? "refused by the kernel" : "done"): \(s1.spteZapped - s0.spteZapped) SPTEs zapped, \(s1.iommuEntriesZapped - s0.iommuEntriesZapped) IOMMU entries removed, \(s1.pagesZeroed - s0.pagesZeroed) pages zeroed; \(format2(us)) µs in the VMM and the model, which checks every transition")
            }
            costs.removeAll()
        }

        _ = try program("1. The guest boots and fills its private memory", [
            .fill(gpa: Self.base, length: Self.size, pattern: [0x5e, 0xc2]), .report(1),
        ])
        emit("     reach of the I/O buffer: \(reach(map, nic))")
        invariants()

        _ = try program("2. The guest shares a 64 KiB I/O buffer and writes a request into it", [
            .convert(ConversionRequest(gpa: Self.buffer, npages: Self.bufferPages, toPrivate: false, channel: .doorbell)),
            .fill(gpa: Self.buffer, length: 64, pattern: Array("GET /index.html ".utf8)), .report(2),
        ])
        conversionsSoFar()
        emit("     reach of the I/O buffer: \(reach(map, nic))")
        let request = try b.dma(domain: nic, iova: Self.buffer, write: nil, count: 16)
        emit("     the NIC reads the request by DMA: \"\(String(decoding: request, as: UTF8.self))\"")
        _ = try b.dma(domain: nic, iova: Self.buffer + 4096, write: Array("200 OK".utf8), count: 6)
        emit("     the NIC writes a reply into the buffer's second page")
        invariants()

        let pin = try b.pin(address: map.address + (Self.buffer - Self.base) + 8192, length: 4096, longterm: false)
        emit("   3. Meanwhile the VMM pins a buffer page for an in-flight I/O of its own")
        _ = try program("4. The guest takes the buffer back (first attempt)", [
            .convert(ConversionRequest(gpa: Self.buffer, npages: Self.bufferPages, toPrivate: true, channel: .doorbell)),
        ])
        conversionsSoFar()
        if let e = handler.log.last?.error { emit("     the VMM answered \(e) and rolled the NIC's unmapping back") }
        emit("     reach of the I/O buffer: \(reach(map, nic))")
        try b.unpin(pin)
        emit("   5. The VMM's I/O completes and it unpins")
        _ = try program("6. The guest retries, then checks the reply", [
            .convert(ConversionRequest(gpa: Self.buffer, npages: Self.bufferPages, toPrivate: true, channel: .doorbell)),
            .verify(gpa: Self.buffer + 4096, length: 6, pattern: Array("200 OK".utf8)), .report(6),
        ])
        conversionsSoFar()
        emit("     reach of the I/O buffer: \(reach(map, nic))")
        invariants()

        _ = try program("7. A hostile guest", [
            .convert(ConversionRequest(gpa: Self.buffer + 1, npages: 1, toPrivate: false, channel: .doorbell)),
            .convert(ConversionRequest(gpa: Self.buffer, npages: 1 << 62, toPrivate: false, channel: .doorbell)),
            .convert(ConversionRequest(gpa: 8 << 30, npages: 1, toPrivate: true, channel: .doorbell)),
            .report(7),
        ])
        costs.removeAll()
        invariants()
        let s = b.kernel.stats
        emit("   totals: \(s.conversionsDone) conversions done, \(s.conversionsRefused) refused; \(s.spteZapped) SPTEs and \(s.iommuEntriesZapped) IOMMU entries removed; \(s.pagesZeroed) pages zeroed (each once, at first touch)")
        return ok
    }

    /// Step 3's race, every way it can go: the VMM pins a buffer page with
    /// pin_user_pages_fast() while the guest converts it to private. The explorer runs
    /// every interleaving of GUP-fast's lockless walk, grab and recheck with the
    /// conversion's check and flip; then once more with the recheck removed.
    func racePart() -> Bool {
        emit("")
        emit("== Step 3's race, every interleaving (the explorer)")
        let race = TourScenarios.demoRace
        guard let scenario = try? ScenarioParser.parse(text: race.text, file: race.file) else { return false }
        let t0 = monotonicSeconds()
        let shipped = ExploreRunner(scenario).explorer.exhaustive(preemptionBound: 2)
        var broken = ModelConfig.mainline
        broken.mutants = [.gupFastSkipRecheck]
        let mutant = ExploreRunner(scenario, config: broken).explorer.exhaustive(preemptionBound: 2)
        let ms = (monotonicSeconds() - t0) * 1000
        emit("   the host pins the page with GUP-fast (walk, grab, recheck) while the VMM converts it (check, flip):")
        emit("   \(shipped.schedules) schedules, \(shipped.states) states, every invariant after every step: \(shipped.counterexample == nil ? "no violation" : "VIOLATION")")
        emit("     the pin first: the conversion sees it and fails with EAGAIN; the conversion first: the recheck finds the PTE gone and lets go")
        guard let c = mutant.counterexample else {
            emit("   with GUP-fast's recheck removed: not caught (a check failed)")
            return false
        }
        emit("   with GUP-fast's recheck removed, schedule \(c.schedule) (\(mutant.schedules) schedules in):")
        for t in c.trace { emit("     \(t)") }
        for v in c.violations { emit("     VIOLATION \(v)") }
        emit("   (\(Int(ms)) ms for both; `gmem explore --mutants scenarios/explore/` runs all 18 deliberate bugs against 16 races)")
        return shipped.counterexample == nil
    }

    /// The real kernel: the same guest program on a real vCPU, its doorbell reaching
    /// the same manager, which this kernel cannot let convert.
    func kernelPart() {
        emit("")
        emit("== On this machine's KVM")
        #if os(Linux)
        if let why = KernelBackend.unavailableReason() {
            emit("   skipped: \(why)")
            return
        }
        do {
            let k = try KernelBackend()
            let vm = try k.createVM(type: 0)
            let gmem = try k.createGuestMemfd(on: vm, size: Self.size, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
            try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: Self.base, memorySize: Self.size, userspaceAddr: 0,
                guestMemfd: UInt32(gmem.raw)))
            let vcpu = try k.createVCPU(vm: vm, id: 0)
            let manager = ConversionManager(backend: k, vm: vm, policy: k.capability(.guestMemfdMemoryAttributes) != 0 ? .inPlace : .attributes,
                                            regions: [ManagedRegion(gpa: Self.base, size: Self.size, gmem: gmem)])
            let handler = GuestRequestHandler(manager: manager)
            var vmmTimes: [Double] = []
            let t0 = now()
            let r = try k.runGuestProgram(vcpu: vcpu, GuestProgram([
                .fill(gpa: Self.base, length: Self.size, pattern: [0x5e, 0xc2]),
                .verify(gpa: Self.base, length: Self.size, pattern: [0x5e, 0xc2]),
                .convert(ConversionRequest(gpa: Self.buffer, npages: Self.bufferPages, toPrivate: false, channel: .doorbell)),
                .convert(ConversionRequest(gpa: Self.buffer, npages: 1, toPrivate: false, channel: .hypercall)),
                .report(1),
            ])) { req in
                let t = now()
                let answer = handler.handle(req)
                vmmTimes.append(now() - t)
                return answer
            }
            emit("   a default VM (the only type here) with 4 MiB of guest_memfd; real x86-64 code at CPL3 on a real vCPU (\(format2((now() - t0) / 1000)) ms)")
            for e in r.events { emit("     guest: \(describe(e))") }
            if let e = handler.log.first?.error {
                emit("     the doorbell reached the VMM's manager (\(format2(vmmTimes.first ?? 0)) µs there); this kernel cannot convert (\(e)), so the guest was told so")
            }
            emit("     KVM answered the CPL3 hypercall itself (-1 = -KVM_EPERM): hypercall exits need a CPL0 guest")
            emit("     end: \(r.end == .completed([]) ? "the program ran to its end" : "\(r.end)")")
        } catch {
            emit("   the kernel run failed: \(error)")
        }
        #else
        emit("   skipped: the kernel backend needs Linux")
        #endif
    }

    func describe(_ e: GuestEvent) -> String {
        switch e {
        case .reported(let v): "reports progress \(v)"
        case .verified(let gpa, let len, let at):
            at.map { "verify \(len) bytes at \(hex(gpa)): MISMATCH at +\($0)" } ?? "verify \(len) bytes at \(hex(gpa)): ok"
        case .conversion(let r, let result):
            "asks (\(r.channel.rawValue)) for \(r.npages < 1 << 20 ? String(r.npages) : hex(r.npages)) pages at \(hex(r.gpa)) to be \(r.toPrivate ? "private" : "shared"): \(result == 0 ? "done" : "answer \(r.channel == .doorbell ? Int64(Int32(bitPattern: UInt32(truncatingIfNeeded: result))) : Int64(bitPattern: result))")"
        }
    }

    func format2(_ v: Double) -> String {
        let n = Int((v * 10).rounded())
        return "\(n / 10).\(n % 10)"
    }
}
