import ArgumentParser
import GMemBackend
import GMemModel
import GMemScenario

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one guest workload under every policy combination and compare them.",
        discussion: """
            Conversion model (x86 attributes, in place) x binding ownership (file holds VM, \
            memslots hold file) x IOMMU (VFIO, hypervisor-managed, nested). Exit 1 if any \
            combination breaks an invariant.
            """)

    @Flag(help: "One JSON object per combination.")
    var json = false

    func run() throws {
        let rows = PolicyComparison.runAll()
        if json {
            for r in rows {
                emit(JSON.object(JSONObject([
                    "conversion": .string(r.conversion.rawValue), "binding": .string(r.binding.rawValue),
                    "iommu": .string(r.iommu.rawValue), "conversions_done": .int(r.stats.conversionsDone),
                    "conversions_refused": .int(r.stats.conversionsRefused), "iommu_maps_refused": .int(r.iommuMapsRefused),
                    "unsafe_order_refused": .bool(r.unsafeOrderRefused), "dma_faults": .int(r.dmaFaults),
                    "bytes_zeroed": .int(r.stats.pagesZeroed * 4096), "bytes_copied": .int(r.stats.pagesCopied * 4096),
                    "spte_zapped": .int(r.stats.spteZapped), "iommu_entries_zapped": .int(r.stats.iommuEntriesZapped),
                    "vmas_created": .int(r.stats.vmasCreated), "device_data_kept_pages": .int(r.deviceDataKept),
                    "after_close": .string(r.afterClose), "violations": .array(r.violations.map { .string($0.description) }),
                ])).rendered)
            }
        } else {
            emit("""
                One workload (64 guest pages; 16 shared with a device, then taken back) under every policy.
                conv: conversions done/refused; unsafe: converting back before unmapping the device was refused;
                zeroed/copied: KiB; zaps: SPTEs/IOMMU entries; kept: shared pages whose device data survived
                the return to private; close: the guest's next access after the VMM closed its guest_memfd fd.

                """)
            let header = ["conversion", "binding", "iommu", "conv", "maps refused", "unsafe", "dma faults",
                          "zeroed", "copied", "zaps", "VMAs", "kept", "close", "violations"]
            var table = [header]
            for r in rows {
                table.append([
                    r.conversion.rawValue, r.binding.rawValue, r.iommu.rawValue,
                    "\(r.stats.conversionsDone)/\(r.stats.conversionsRefused)", "\(r.iommuMapsRefused)",
                    r.unsafeOrderRefused ? "refused" : "allowed", "\(r.dmaFaults)", "\(r.stats.pagesZeroed * 4)",
                    "\(r.stats.pagesCopied * 4)", "\(r.stats.spteZapped)/\(r.stats.iommuEntriesZapped)", "\(r.stats.vmasCreated)",
                    "\(r.deviceDataKept)/16", r.afterClose, "\(r.violations.count)",
                ])
            }
            let widths = header.indices.map { i in table.map { $0[i].count }.max()! }
            for (n, line) in table.enumerated() {
                emit(line.enumerated().map { $0.element.padding(widths[$0.offset]) }.joined(separator: "  "))
                if n == 0 { emit(widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")) }
            }
            for r in rows where !r.violations.isEmpty {
                emit("")
                emit("\(r.conversion.rawValue)/\(r.binding.rawValue)/\(r.iommu.rawValue):")
                for v in r.violations { emit("  \(v)") }
            }
        }
        if rows.contains(where: { !$0.violations.isEmpty }) { throw ExitCode(1) }
    }
}
