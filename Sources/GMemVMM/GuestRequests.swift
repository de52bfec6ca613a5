import GMemBackend

/// Answers a guest's conversion requests (port-I/O doorbell, KVM_HC_MAP_GPA_RANGE,
/// memory-fault exits) through a ConversionManager. Whatever the guest asks, the VMM
/// answers with a number in RAX and carries on: 0 for done, or -errno.
public final class GuestRequestHandler {
    public let manager: ConversionManager
    /// Each request, what the guest was told, and the manager's error if any.
    public private(set) var log: [(request: ConversionRequest, result: UInt64, error: ConversionError?)] = []
    /// A guest may not ask for more than this at once (TDX's MapGPA is chunked at 2 MiB
    /// by the kernel; a VMM bounds the work one exit can make it do).
    public var maxPagesPerRequest: UInt64 = 1 << 18

    public init(manager: ConversionManager) {
        self.manager = manager
    }

    /// -errno as the guest sees it in RAX.
    public static func code(_ e: Errno) -> UInt64 { UInt64(bitPattern: -Int64(e.rawValue)) }

    /// KVM_EXIT_MEMORY_FAULT as an implicit conversion (QEMU's kvm_convert_memory on
    /// a memory fault): the guest touched the side its page is not on, so convert the
    /// page to the side the exit says the guest wanted. Returns whether to run the vCPU
    /// again. Exits with other flags, or that the conversion cannot satisfy, are for the
    /// caller to report.
    public func handleMemoryFault(_ exit: VMExit) -> Bool {
        guard case .memoryFault(let flags, let gpa, let size) = exit,
            flags & ~UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE == 0
        else { return false }
        let toPrivate = flags & UAPI.KVM_MEMORY_EXIT_FLAG_PRIVATE != 0
        // Only a mismatch is a conversion request; a fault on the right side (a closed
        // file, a missing slot) is not the VMM's to fix by converting.
        guard manager.isPrivate(gpa: gpa) != toPrivate else { return false }
        let request = ConversionRequest(gpa: gpa, npages: max(size / 4096, 1), toPrivate: toPrivate, channel: .memoryFault)
        return handle(request) == 0
    }

    public func handle(_ r: ConversionRequest) -> UInt64 {
        var error: ConversionError?
        let result: UInt64
        // As KVM validates KVM_HC_MAP_GPA_RANGE: aligned gpa, npages > 0, no wrap.
        let (size, overflow) = r.npages.multipliedReportingOverflow(by: 4096)
        if r.gpa % 4096 != 0 || r.npages == 0 || overflow || r.gpa.addingReportingOverflow(size).overflow {
            result = Self.code(.EINVAL)
        } else if r.npages > maxPagesPerRequest {
            result = Self.code(.E2BIG)
        } else {
            do {
                try manager.convert(gpa: r.gpa, size: size, toPrivate: r.toPrivate)
                result = 0
            } catch let e {
                error = e
                result = Self.code(e.errno)
            }
        }
        log.append((r, result, error))
        return result
    }
}

/// A device behind an IOMMU domain that maps guest memory while it is shared: what
/// QEMU's VFIO RamDiscardListener does. IOVA = guest physical address.
///
/// VFIO type1 refuses an unmap that splits a mapping, so the listener maps at the
/// granularity at which memory can later turn private (one MAP_DMA per `granularity`,
/// a page by default, as QEMU and cloud-hypervisor do for guest_memfd) and unmaps
/// whole runs of those mappings in one call. The price is one IOMMU mapping per page
/// (VFIO's dma_entry_limit must allow as many).
public final class IOMMUListener: ConversionListener {
    public let name: String
    let backend: any Backend
    let domain: ObjectHandle
    /// The host mapping of the region (the shared side) and the gpa it starts at.
    let hostAddress: UInt64
    let gpaBase: UInt64
    /// The size of each DMA mapping; conversions come in multiples of it.
    public let granularity: UInt64

    public init(name: String, backend: any Backend, domain: ObjectHandle, hostAddress: UInt64, gpaBase: UInt64,
                granularity: UInt64 = UAPI.pageSize) {
        self.name = name
        self.backend = backend
        self.domain = domain
        self.hostAddress = hostAddress
        self.gpaBase = gpaBase
        self.granularity = granularity
    }

    public func willMakePrivate(gpa: UInt64, size: UInt64) throws(ConversionError) {
        do {
            try backend.iommuUnmap(domain: domain, iova: gpa, length: size)
        } catch {
            throw ConversionError(errno: ConversionManager.errno(error), gpa: gpa, stage: .listener, who: name)
        }
    }

    /// Maps [gpa, gpa + size) one granule at a time; on a failure, unmaps what it
    /// mapped (whole granules: VFIO accepts that) and reports the granule that failed.
    public func didMakeShared(gpa: UInt64, size: UInt64) throws(ConversionError) {
        var at = gpa
        while at < gpa + size {
            let length = min(granularity, gpa + size - at)
            do {
                try backend.iommuMap(domain: domain, iova: at, address: hostAddress + (at - gpaBase), fd: nil, offset: 0, length: length)
            } catch {
                if at > gpa { try? backend.iommuUnmap(domain: domain, iova: gpa, length: at - gpa) }
                throw ConversionError(errno: ConversionManager.errno(error), gpa: at, stage: .listener, who: name)
            }
            at += length
        }
    }
}
