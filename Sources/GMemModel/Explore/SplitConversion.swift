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

    /// Whether `call` would wait for an operation the explorer paused (a lock it
    /// holds, a memslot it is deleting): runs it on a copy of the kernel and looks.
    /// In the kernel the call would sleep there and go on when the holder lets go;
    /// the explorer does not run it until then. Free when nothing is paused.
    public func waits(_ call: (inout Kernel) -> Void) -> Bool {
        guard somethingPaused else { return false }
        var k = self
        k.wouldWait = false
        call(&k)
        return k.wouldWait
    }
}
