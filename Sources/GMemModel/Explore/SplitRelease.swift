import GMemBackend

/// The last close of a guest_memfd file, paused between fput() dropping the last
/// reference and kvm_gmem_release() taking slots_lock.
public struct PendingRelease: Hashable, Sendable {
    let file: UInt64
}

extension Kernel {
    /// close(2), first step: drop `fd`. When that was the file's last reference the
    /// file is dying: get_file_active() fails from now on, so faults through its
    /// memslots get EFAULT and kvm_gmem_unbind() cannot take a reference. Returns the
    /// release still to run, or nil when the close finished (not the last reference,
    /// or not a guest_memfd file).
    public mutating func closeDeferringRelease(_ fd: Int32) throws(Errno) -> PendingRelease? {
        guard let id = fds[fd] else { throw .EBADF }
        guard case .guestMemfd = files[id]?.kind, files[id]!.refs == 1 else {
            try close(fd)
            return nil
        }
        fds[fd] = nil
        nextFD = min(nextFD, fd)
        files[id] = nil
        gmemFiles[id]!.dying = true
        return PendingRelease(file: id)
    }

    /// close(2), second step: kvm_gmem_release() under slots_lock and
    /// filemap_invalidate_lock (atomic with memslot updates, which hold slots_lock).
    public mutating func finishRelease(_ p: PendingRelease) {
        gmemRelease(file: p.file)
    }
}
