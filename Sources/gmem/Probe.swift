import ArgumentParser
import GMemBackend
import GMemScenario

#if os(Linux)
import GMemKernel
#endif

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what this host's KVM offers, and which parts run for real here.",
        discussion: "Exit status 3 when /dev/kvm cannot be used (the message says why).")

    @Flag(help: "One JSON object instead of text.")
    var json = false

    @Option(help: "Probe a reference kernel booted under qemu instead (linux-6.12).")
    var on: String?

    func run() throws {
        if let on { try ReferenceKernel.relay(on) }
        #if os(Linux)
        let probe: HostProbe
        switch HostProbe.run() {
        case .success(let p): probe = p
        case .failure(let e):
            if case .unsupported(let why) = e { emitError("gmem: cannot probe: \(why)") } else { emitError("gmem: cannot probe: \(e)") }
            throw ExitCode(3)
        }
        if json {
            var caps = JSONObject()
            for c in probe.capabilities {
                caps[c.cap.rawValue] = .object(JSONObject(["kvm": .int(c.kvm), "default_vm": .int(c.defaultVM)]))
            }
            var coverage = JSONObject()
            for c in probe.coverage {
                coverage[c.part] = .object(JSONObject(["real": .bool(c.real), "why": .string(c.why)]))
            }
            let o = JSONObject([
                "api_version": .int(probe.apiVersion),
                "cpu_vendor": .string(probe.cpuVendor),
                "capabilities": .object(caps),
                "vm_types": .array(probe.vmTypes.map { .string($0.rawValue) }),
                "guest_memfd_flags": .int(probe.gmemFlags),
                "set_memory_attributes": .string(probe.setMemoryAttributes),
                "pre_fault_memory": .string(probe.preFaultMemory),
                "guest_code": .string(probe.guestCode),
                "hypercall_exit": .string(probe.hypercall),
                "coverage": .object(coverage),
            ])
            emit(JSON.object(o).rendered)
            return
        }
        emit("KVM API version \(probe.apiVersion), \(probe.cpuVendor) CPU")
        emit("")
        emit("capability                      /dev/kvm    default VM")
        for c in probe.capabilities {
            let name = c.cap.rawValue.padding(30)
            emit("  \(name)  " + hex(c.kvm).padding(10) + "  " + hex(c.defaultVM))
        }
        emit("")
        emit("VM types accepted:        " + probe.vmTypes.map(\.rawValue).joined(separator: ", "))
        emit("guest_memfd flags:        0x" + String(probe.gmemFlags, radix: 16))
        emit("KVM_SET_MEMORY_ATTRIBUTES: " + probe.setMemoryAttributes)
        emit("KVM_PRE_FAULT_MEMORY:     " + probe.preFaultMemory)
        emit("guest code:               " + probe.guestCode)
        emit("hypercall exits:          " + probe.hypercall)
        emit("")
        emit("runs for real here         part")
        for c in probe.coverage {
            emit("  " + (c.real ? "kernel + model " : "model only     ") + "  " + c.part + "  (" + c.why + ")")
        }
        #else
        emitError("gmem: probe needs Linux and /dev/kvm")
        throw ExitCode(3)
        #endif
    }

    func hex(_ v: UInt64) -> String { v > 9 ? "0x" + String(v, radix: 16) : String(v) }
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}
