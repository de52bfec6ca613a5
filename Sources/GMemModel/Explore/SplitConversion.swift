import GMemBackend

/// An in-place to-private conversion between its refcount check and its flip, with
/// filemap_invalidate_lock held (unless a mutant dropped it).
public struct PendingConversion: Hashable, Sendable {
    let ino: UInt64
    let range: Range<UInt64>
    let vm: UInt64?
}

extension Kernel {
    /// In-place to-private, first step: take filemap_invalidate_lock, unmap the host's
    /// mappings, check that nothing else holds the pages. Returns the pending flip, or
    /// the outcome when the conversion ends here (an error, EAGAIN, or nothing to do).
    public mutating func beginToPrivate(_ fd: Int32, offset: UInt64, size: UInt64) -> (PendingConversion?, ConversionOutcome) {
        let done = ConversionOutcome(errno: nil, errorOffset: 0)
        do {
            try convertChecks(fd, offset: offset, size: size, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        } catch {
            return (nil, ConversionOutcome(errno: error, errorOffset: 0))
        }
        guard case .guestMemfd(let ino)? = fds[fd].flatMap({ files[$0]?.kind }) else {
            return (nil, ConversionOutcome(errno: .EBADF, errorOffset: 0))
        }
        let range = (offset >> UAPI.pageShift)..<((offset + size) >> UAPI.pageShift)
        if gmemInodes[ino]!.privatePages.allEqual(in: range, to: true) { return (nil, done) }
        unmapMappingRange(.guestMemfd(ino), pgoffs: range)
        let busy = config.mutants.contains(.skipRefcountCheck) ? nil : firstPageInUse(ino, range)
        if let busy = busy ?? firstIOMMUMappedPage(ino, range) {
            counters.conversionsRefused += 1
            return (nil, ConversionOutcome(errno: .EAGAIN, errorOffset: busy << UAPI.pageShift))
        }
        gmemInodes[ino]!.invalidateLocked = !config.mutants.contains(.conversionDropsInvalidateLock)
        return (PendingConversion(ino: ino, range: range, vm: gmemFiles[fds[fd]!]?.vm ?? nil), done)
    }

    /// In-place to-private, second step: zap the stage-2, flip the pages to private,
    /// release filemap_invalidate_lock.
    public mutating func commitToPrivate(_ p: PendingConversion) {
        gmemInvalidate(p.ino, p.range)
        gmemInodes[p.ino]!.privatePages.set(p.range, to: true)
        counters.conversionsDone += 1
        if let vm = p.vm, vms[vm]?.type.conversionIsLossy == true, !config.mutants.contains(.lossyConversionWithoutZeroing) {
            for pgoff in presentKeys(of: gmemInodes[p.ino]!.folios, in: p.range) { phys.zero(gmemInodes[p.ino]!.folios[pgoff]!) }
        }
        gmemInodes[p.ino]!.invalidateLocked = false
    }

    /// Whether a host access at `address` would sleep on filemap_invalidate_lock:
    /// it must fault (no usable PTE) on a guest_memfd whose lock a conversion holds.
    public func hostFaultWouldBlock(address: UInt64, write: Bool) -> Bool {
        let vpn = address >> UAPI.pageShift
        if let pte = mm.ptes[vpn], pte.writable || !write { return false }
        guard let vma = mm.vmas.value(at: vpn), case .file(_, .guestMemfd(let ino)) = vma.backing else { return false }
        return gmemInodes[ino]?.invalidateLocked == true
    }
}
