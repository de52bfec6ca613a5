import GMemBackend

/// A conversion between its checks and its flip (in-place to-private holds
/// filemap_invalidate_lock across the gap, unless a mutant dropped it).
public struct PendingConversion: Hashable, Sendable {
    let ino: UInt64
    let range: Range<UInt64>
    let toPrivate: Bool
    let vm: UInt64?
    /// The file the split ioctl holds a reference on (fdget) until its flip.
    var file: UInt64?
}

extension Kernel {
    /// In-place to-private, first step: take filemap_invalidate_lock, unmap the host's
    /// mappings, check that nothing else holds the pages. Returns the pending flip, or
    /// the outcome when the conversion ends here (an error, EAGAIN, or nothing to do).
    public mutating func beginToPrivate(_ fd: Int32, offset: UInt64, size: UInt64) -> (PendingConversion?, ConversionOutcome) {
        var (pending, outcome) = prepareConversion(fd, offset: offset, size: size, attributes: UAPI.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags: 0)
        if pending != nil, let fileID = fds[fd] {
            gmemInodes[pending!.ino]!.invalidateLocked = !config.mutants.contains(.conversionDropsInvalidateLock)
            // fdget(): a close meanwhile cannot release the file under the ioctl.
            getFile(fileID)
            pending!.file = fileID
        }
        return (pending, outcome)
    }

    /// In-place to-private, second step: the flip, then release filemap_invalidate_lock.
    public mutating func commitToPrivate(_ p: PendingConversion) {
        commitConversion(p)
        gmemInodes[p.ino]!.invalidateLocked = false
        if let file = p.file { putFile(file) }
    }
}

extension Kernel {
    /// filemap_invalidate_lock() (`exclusive`) or its shared form on inode `ino`, as
    /// far as the model needs it: no operation holds it across calls except those the
    /// explorer paused (a conversion, exclusively; an IOMMU map, shared), so taking it
    /// only notes when the caller would sleep on one of them.
    mutating func invalidateLock(_ ino: UInt64, exclusive: Bool) {
        guard let inode = gmemInodes[ino] else { return }
        if inode.invalidateLocked || (exclusive && inode.invalidateReaders > 0) { wouldWait = true }
    }

    /// Whether some paused operation holds a filemap_invalidate_lock or is deleting a
    /// memslot: only then can a step have to wait.
    public var somethingPaused: Bool {
        gmemInodes.values.contains { $0.invalidateLocked || $0.invalidateReaders > 0 }
            || vms.values.contains { $0.memslots.values.contains(where: \.invalid) }
    }

    /// Starts a trial run: forget any earlier wait.
    public mutating func resetWait() { wouldWait = false }

    /// The guest_memfd inode behind `fd` in the current process, if it is one.
    func gmemInode(ofFD fd: Int32) -> UInt64? {
        guard let id = fds[fd], case .guestMemfd(let ino)? = files[id]?.kind else { return nil }
        return ino
    }

    /// Whether a to-private conversion of `fd` would wait for filemap_invalidate_lock:
    /// another conversion holds it, or a paused IOMMU map holds it shared.
    public func conversionWouldBlock(fd: Int32) -> Bool {
        guard let ino = gmemInode(ofFD: fd), let inode = gmemInodes[ino] else { return false }
        return inode.invalidateLocked || inode.invalidateReaders > 0
    }

    /// Whether a hypervisor-managed IOMMU map of `fd` would wait: a conversion holds
    /// filemap_invalidate_lock exclusively.
    public func iommuMapWouldBlock(fd: Int32) -> Bool {
        guard let ino = gmemInode(ofFD: fd) else { return false }
        return gmemInodes[ino]?.invalidateLocked == true
    }
}
