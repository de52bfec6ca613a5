import GMemBackend

/// One guest workload under every combination of the design's policies, with what
/// each combination did, allowed and refused.
///
/// The workload: a sw_protected VM with 64 pages of guest_memfd at 1 GiB. The guest
/// writes all of it privately, shares pages 0..<16, a device writes them through its
/// IOMMU, the guest takes them back to private (the VMM first tries converting before
/// unmapping the device, then in the safe order), reads everything, and finally the
/// guest_memfd fd is closed while the guest still runs. The invariant checker runs
/// after every step.
public enum PolicyComparison {
    public struct Row: Hashable, Sendable {
        public var conversion: ConversionPolicy
        public var binding: BindingOwnership
        public var iommu: IOMMUModel
        public var stats = Stats()
        /// IOMMU map calls refused (a private page, or a model that cannot map it).
        public var iommuMapsRefused = 0
        /// Device accesses that faulted.
        public var dmaFaults = 0
        /// Whether converting back to private before unmapping the device was refused.
        public var unsafeOrderRefused = false
        /// Of the 16 shared pages, how many still held the device's data when the guest
        /// read them privately (0: the conversion discarded or zeroed them).
        public var deviceDataKept = 0
        /// The guest's access after the guest_memfd fd was closed: "ok" or the errno.
        public var afterClose = ""
        public var violations: [Violation] = []
    }

    static let pages: UInt64 = 64
    static let shared: UInt64 = 16
    static let base: UInt64 = 1 << 30
    static let page: UInt64 = 4096

    public static func runAll() -> [Row] {
        var rows: [Row] = []
        for conversion in ConversionPolicy.allCases {
            for binding in BindingOwnership.allCases {
                for iommu in IOMMUModel.allCases {
                    rows.append(run(conversion: conversion, binding: binding, iommu: iommu))
                }
            }
        }
        return rows
    }

    public static func run(conversion: ConversionPolicy, binding: BindingOwnership, iommu: IOMMUModel) -> Row {
        var row = Row(conversion: conversion, binding: binding, iommu: iommu)
        var config = ModelConfig.mainline
        config.bindingOwnership = binding
        let b = ModelBackend(config: config)
        func check() { row.violations += b.kernel.checkSystemInvariants() }
        do {
            let vm = try b.createVM(type: VMType.swProtected.number, conversion: conversion)
            let size = pages * page
            let hva: Mapping
            let gmem: FD
            if conversion == .attributes {
                // x86: private pages in guest_memfd, shared pages in a separate memfd.
                let backing = try b.memfdCreate(size: size)
                hva = try b.mmap(fd: backing, offset: 0, length: size, prot: [.read, .write], shared: true)
                gmem = try b.createGuestMemfd(on: vm, size: size, flags: 0)
            } else {
                gmem = try b.createGuestMemfd(on: vm, size: size, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
                hva = try b.mmap(fd: gmem, offset: 0, length: size, prot: [.read, .write], shared: true)
            }
            try b.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
                slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: base, memorySize: size,
                userspaceAddr: hva.address, guestMemfd: UInt32(gmem.raw)))
            if conversion == .attributes {
                try b.setMemoryAttributes(vm: vm, address: base, size: size, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
            }
            let vcpu = try b.createVCPU(vm: vm, id: 0)
            _ = try b.guestAccess(vcpu: vcpu, GuestAccess(gpa: base, kind: .write([UInt8](repeating: 0xaa, count: Int(size)))))
            check()

            // The guest shares pages 0..<16; the VMM converts and discards the stale side.
            try convert(b, vm: vm, gmem: gmem, conversion: conversion, toPrivate: false)
            check()

            // The VMM maps the shared pages for the device.
            let domain = try b.createIOMMUDomain(iommu, vm: iommu == .nested ? vm : nil)
            // SVA devices use the VMM's own virtual addresses; the others map at IOVA 0.
            let iova: UInt64 = iommu == .sva ? hva.address : 0
            var mapped = false
            do {
                switch iommu {
                case .vfio: try b.iommuMap(domain: domain, iova: 0, address: hva.address, fd: nil, offset: 0, length: shared * page)
                case .hypervisor: try b.iommuMap(domain: domain, iova: 0, address: nil, fd: gmem, offset: 0, length: shared * page)
                case .nested: try b.iommuMap(domain: domain, iova: 0, address: nil, fd: nil, offset: base, length: shared * page)
                case .sva: break  // nothing to map: the device walks the process's page tables
                }
                mapped = iommu != .sva
            } catch {
                row.iommuMapsRefused += 1
            }
            do {
                _ = try b.dma(domain: domain, iova: iova, write: [UInt8](repeating: 0xdd, count: Int(shared * page)), count: shared * page)
            } catch {
                row.dmaFaults += 1
            }
            check()

            // Back to private: first in the unsafe order (device still mapped)...
            if mapped {
                let before = b.kernel.stats.conversionsRefused
                try? convert(b, vm: vm, gmem: gmem, conversion: conversion, toPrivate: true)
                row.unsafeOrderRefused = b.kernel.stats.conversionsRefused > before
                check()
                try b.iommuUnmap(domain: domain, iova: 0, length: shared * page)
            }
            // ...then in the safe order: unmap before to-private.
            try? convert(b, vm: vm, gmem: gmem, conversion: conversion, toPrivate: true)
            do {
                _ = try b.dma(domain: domain, iova: iova, write: nil, count: 1)
            } catch {
                row.dmaFaults += 1
            }
            check()

            if case .completed(let bytes) = try b.guestAccess(vcpu: vcpu, GuestAccess(gpa: base, kind: .read(count: shared * page))) {
                row.deviceDataKept = (0..<Int(shared)).filter { bytes[$0 * Int(page)] == 0xdd }.count
            }

            // The VMM closes its guest_memfd fd (and mapping) while the guest runs.
            if conversion == .inPlace { try b.munmap(hva) }
            try b.close(gmem)
            switch try b.guestAccess(vcpu: vcpu, GuestAccess(gpa: base + 32 * page, kind: .read(count: 1))) {
            case .completed: row.afterClose = "ok"
            case .failed(let e, _): row.afterClose = e.name
            case .exit(let x): row.afterClose = x.reasonName
            }
            check()
        } catch {
            row.afterClose = "workload failed: \(error)"
        }
        row.stats = b.kernel.stats
        return row
    }

    /// What a VMM does for a guest's conversion request on pages 0..<16.
    static func convert(_ b: ModelBackend, vm: FD, gmem: FD, conversion: ConversionPolicy, toPrivate: Bool) throws(BackendError) {
        let length = shared * page
        switch conversion {
        case .attributes:
            try b.setMemoryAttributes(vm: vm, address: base, size: length,
                                      attributes: toPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0)
            if !toPrivate {
                // Discard the private side (QEMU punches guest_memfd on to-shared).
                try b.fallocate(gmem, mode: UAPI.FALLOC_FL_KEEP_SIZE | UAPI.FALLOC_FL_PUNCH_HOLE, offset: 0, length: length)
            }
        case .inPlace:
            let r = try b.setGuestMemfdAttributes(fd: gmem, offset: 0, size: length,
                                                  attributes: toPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0, flags: 0)
            if let e = r.errno { throw .errno(e) }
        }
    }
}
