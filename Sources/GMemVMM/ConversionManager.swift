import GMemBackend
import GMemModel  // for RangeMap, a general structure that lives in the model module for now

/// Something that must hear about conversions: a device's DMA mappings (VFIO), a
/// vhost backend, a migration dirty tracker. QEMU calls these RamDiscardListeners.
public protocol ConversionListener: AnyObject {
    var name: String { get }
    /// Pages [gpa, gpa + size) are about to become private: stop using them (unmap).
    /// Throwing vetoes the conversion; everything done so far is rolled back.
    func willMakePrivate(gpa: UInt64, size: UInt64) throws(ConversionError)
    /// Pages [gpa, gpa + size) are shared now: they may be used (map). Throwing vetoes
    /// the conversion; everything done so far is rolled back.
    func didMakeShared(gpa: UInt64, size: UInt64) throws(ConversionError)
}

/// Why a conversion did not happen, and where.
public struct ConversionError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Stage: String, Hashable, Sendable {
        case validation, listener, kernel, discard
    }
    public var errno: Errno
    /// The guest physical address of the first page that stopped it.
    public var gpa: UInt64
    public var stage: Stage
    public var who: String
    public init(errno: Errno, gpa: UInt64, stage: Stage, who: String) {
        self.errno = errno
        self.gpa = gpa
        self.stage = stage
        self.who = who
    }
    public var description: String { "\(errno.name) at gpa 0x\(String(gpa, radix: 16)) (\(stage.rawValue): \(who))" }
}

/// One guest memory region the VMM manages: a memslot bound to a guest_memfd, and for
/// the x86 attribute model the shared backing behind its userspace_addr.
public struct ManagedRegion: Hashable, Sendable {
    public var gpa: UInt64
    public var size: UInt64
    public var gmem: FD
    public var gmemOffset: UInt64
    /// x86 model: the fd whose pages back the shared side (discarded on to-private).
    public var sharedBacking: FD?
    public init(gpa: UInt64, size: UInt64, gmem: FD, gmemOffset: UInt64 = 0, sharedBacking: FD? = nil) {
        self.gpa = gpa
        self.size = size
        self.gmem = gmem
        self.gmemOffset = gmemOffset
        self.sharedBacking = sharedBacking
    }
    var gfns: Range<UInt64> { (gpa >> 12)..<((gpa + size) >> 12) }
}

/// The VMM side of shared/private conversion, over any backend: what QEMU's
/// RamBlockAttributes and kvm_convert_memory() do, with ranges instead of a 4 KiB
/// bitmap, and with rollback.
///
/// Order, as the design requires: listeners unmap before memory turns private and
/// map after it turns shared; the stale side is discarded last (x86 model: the shared
/// backing on to-private, the guest_memfd page on to-shared), since a discard cannot
/// be undone. If any earlier step fails, every step already taken is undone in
/// reverse, and the error names the first offending guest physical address.
public final class ConversionManager {
    public let backend: any Backend
    public let vm: FD
    public let policy: ConversionPolicy
    public let regions: [ManagedRegion]
    /// Private (true) or shared, per gfn of the managed regions; memory starts private.
    public private(set) var state = RangeMap(true)
    private var listeners: [any ConversionListener] = []
    /// After a conversion, map the range into the stage-2 ahead of the guest
    /// (KVM_PRE_FAULT_MEMORY on this vCPU), as QEMU does after SNP page-state changes
    /// to spare the guest one exit per page. Failures are ignored, as there.
    public var prefaultVCPU: FD?

    static let page: UInt64 = 4096

    public init(backend: any Backend, vm: FD, policy: ConversionPolicy, regions: [ManagedRegion], initiallyPrivate: Bool = true) {
        self.backend = backend
        self.vm = vm
        self.policy = policy
        self.regions = regions.sorted { $0.gpa < $1.gpa }
        state = RangeMap(initiallyPrivate)
    }

    /// Registers a listener and replays the shared ranges to it, so it starts in step.
    public func register(_ listener: any ConversionListener) throws(ConversionError) {
        for r in regions {
            for run in state.runs(in: r.gfns) where !run.value {
                try listener.didMakeShared(gpa: run.range.lowerBound << 12, size: UInt64(run.range.count) << 12)
            }
        }
        listeners.append(listener)
    }

    public func isPrivate(gpa: UInt64) -> Bool { state.value(at: gpa >> 12) }

    /// Converts [gpa, gpa + size) to private or shared, all or nothing.
    public func convert(gpa: UInt64, size: UInt64, toPrivate: Bool) throws(ConversionError) {
        let (end, overflow) = gpa.addingReportingOverflow(size)
        if size == 0 || overflow || gpa % Self.page != 0 || size % Self.page != 0 {
            throw ConversionError(errno: .EINVAL, gpa: gpa, stage: .validation, who: "request")
        }
        // The pieces that change, region by region. To-shared of memory no region
        // covers is accepted and ignored (firmware converts MMIO ranges); to-private
        // of it is an error.
        var pieces: [(region: ManagedRegion, gfns: Range<UInt64>)] = []
        var covered = gpa >> 12
        for r in regions {
            let lo = max(gpa >> 12, r.gfns.lowerBound)
            let hi = min(end >> 12, r.gfns.upperBound)
            guard lo < hi else { continue }
            if lo > covered && toPrivate { throw ConversionError(errno: .EINVAL, gpa: covered << 12, stage: .validation, who: "no region") }
            for run in state.runs(in: lo..<hi) where run.value != toPrivate { pieces.append((r, run.range)) }
            covered = hi
        }
        if covered < end >> 12 && toPrivate { throw ConversionError(errno: .EINVAL, gpa: covered << 12, stage: .validation, who: "no region") }

        var undo: [() -> Void] = []
        var discards: [(fd: FD, offset: UInt64, size: UInt64, gpa: UInt64, who: String)] = []
        for piece in pieces {
            let pgpa = piece.gfns.lowerBound << 12
            let psize = UInt64(piece.gfns.count) << 12
            do {
                if toPrivate {
                    try toPrivateSteps(piece.region, gpa: pgpa, size: psize, undo: &undo)
                } else {
                    try toSharedSteps(piece.region, gpa: pgpa, size: psize, undo: &undo)
                }
            } catch {
                for u in undo.reversed() { u() }
                throw error
            }
            if policy == .attributes {
                let r = piece.region
                if toPrivate, let backing = r.sharedBacking {
                    discards.append((backing, pgpa - r.gpa, psize, pgpa, "shared backing"))
                } else if !toPrivate {
                    discards.append((r.gmem, r.gmemOffset + pgpa - r.gpa, psize, pgpa, "guest_memfd"))
                }
            }
        }
        for piece in pieces { state.set(piece.gfns, to: toPrivate) }
        if let vcpu = prefaultVCPU {
            for piece in pieces {
                _ = try? backend.preFaultMemory(vcpu: vcpu, gpa: piece.gfns.lowerBound << 12, size: UInt64(piece.gfns.count) << 12, flags: 0)
            }
        }
        // Discarding the stale side cannot be undone, so it comes after every step that
        // can: the conversion stands even if a discard fails (the error says which).
        for d in discards {
            do {
                try backend.fallocate(d.fd, mode: UAPI.FALLOC_FL_KEEP_SIZE | UAPI.FALLOC_FL_PUNCH_HOLE, offset: d.offset, length: d.size)
            } catch {
                throw ConversionError(errno: Self.errno(error), gpa: d.gpa, stage: .discard, who: d.who)
            }
        }
    }

    /// Listeners unmap, then the kernel converts (the shared copy is discarded after).
    private func toPrivateSteps(_ r: ManagedRegion, gpa: UInt64, size: UInt64, undo: inout [() -> Void]) throws(ConversionError) {
        for l in listeners {
            try l.willMakePrivate(gpa: gpa, size: size)
            undo.append { try? l.didMakeShared(gpa: gpa, size: size) }
        }
        try kernelConvert(r, gpa: gpa, size: size, toPrivate: true)
        undo.append { [self] in try? kernelConvert(r, gpa: gpa, size: size, toPrivate: false) }
    }

    /// The kernel converts, then listeners map (the private copy is discarded after).
    private func toSharedSteps(_ r: ManagedRegion, gpa: UInt64, size: UInt64, undo: inout [() -> Void]) throws(ConversionError) {
        try kernelConvert(r, gpa: gpa, size: size, toPrivate: false)
        undo.append { [self] in try? kernelConvert(r, gpa: gpa, size: size, toPrivate: true) }
        for l in listeners {
            try l.didMakeShared(gpa: gpa, size: size)
            undo.append { try? l.willMakePrivate(gpa: gpa, size: size) }
        }
    }

    private func kernelConvert(_ r: ManagedRegion, gpa: UInt64, size: UInt64, toPrivate: Bool) throws(ConversionError) {
        let attributes = toPrivate ? UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE : 0
        do {
            switch policy {
            case .attributes:
                try backend.setMemoryAttributes(vm: vm, address: gpa, size: size, attributes: attributes, flags: 0)
            case .inPlace:
                let out = try backend.setGuestMemfdAttributes(fd: r.gmem, offset: r.gmemOffset + gpa - r.gpa, size: size, attributes: attributes, flags: 0)
                if let e = out.errno {
                    throw ConversionError(errno: e, gpa: e == .EAGAIN ? r.gpa + out.errorOffset - r.gmemOffset : gpa, stage: .kernel, who: "guest_memfd")
                }
            }
        } catch let e as ConversionError {
            throw e
        } catch {
            throw ConversionError(errno: Self.errno(error), gpa: gpa, stage: .kernel, who: policy == .attributes ? "KVM_SET_MEMORY_ATTRIBUTES" : "guest_memfd")
        }
    }

    static func errno(_ error: any Error) -> Errno {
        if case .errno(let e)? = error as? BackendError { return e }
        return .EIO
    }
}
