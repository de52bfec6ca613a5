import GMemBackend

/// A shmem inode behind memfd_create(2): ordinary shared memory with read/write.
///
/// Pages that hold bytes have a frame in `pages`; `state` says of every page whether it
/// is allocated and uptodate, so fallocate, punch and truncate cost the runs and frames
/// they touch, never the size of their range.
struct ShmemInode: Hashable {
    var size: UInt64
    var pages: [UInt64: UInt64] = [:]
    /// Each page's folio state; allocated pages (either kind) are the inode's i_blocks.
    var state = RangeMap(ShmemPage.hole)
    var refs = 1
    /// secretmem: not in the kernel's direct map, so GUP refuses it (EFAULT).
    var secret = false

    /// Allocated pages (st_blocks / 8).
    ///
    /// - Complexity: O(runs of `state`).
    var allocatedPages: UInt64 {
        var n: UInt64 = 0
        state.forEachRun(in: 0..<UInt64.max) { r, v in
            if v != .hole { n += UInt64(r.count) }
            return true
        }
        return n
    }
}

/// A shmem page's folio: none, fallocated but not uptodate (it reads as zeros and is a
/// hole to SEEK_DATA), or uptodate (written, faulted, or fallocated a second time:
/// SGP_FALLOC on a fallocated folio clears it and marks it uptodate).
enum ShmemPage: Hashable {
    case hole
    case fallocated
    case uptodate
}

extension Kernel {
    /// memfd_create(2) + ftruncate(2).
    public mutating func memfdCreate(size: UInt64, secret: Bool = false) throws(Errno) -> Int32 {
        if Int64(bitPattern: size) < 0 { throw .EINVAL }
        let ino = newID()
        shmemInodes[ino] = ShmemInode(size: size, secret: secret)
        return installFD(.memfd(inode: ino))
    }

    mutating func shmemPut(_ ino: UInt64) {
        shmemInodes[ino]!.refs -= 1
        guard shmemInodes[ino]!.refs == 0 else { return }
        for (_, pfn) in shmemInodes.removeValue(forKey: ino)!.pages { phys.put(pfn) }
    }

    /// shmem_get_folio(SGP_CACHE): the page at `pgoff`, allocated zeroed on demand.
    mutating func shmemGetPage(_ ino: UInt64, pgoff: UInt64) -> UInt64 {
        if let pfn = shmemInodes[ino]!.pages[pgoff] { return pfn }
        let pfn = phys.allocate()
        shmemInodes[ino]!.pages[pgoff] = pfn
        shmemInodes[ino]!.state.set(pgoff..<pgoff + 1, to: .uptodate)
        return pfn
    }

    /// shmem_file_read_iter(): up to EOF, at most MAX_RW_COUNT bytes.
    mutating func shmemRead(_ ino: UInt64, offset: UInt64, count: UInt64) throws(Errno) -> [UInt8] {
        let inode = shmemInodes[ino]!
        guard offset < inode.size else { return [] }
        let end = offset + min(count, Limits.maxRWCount, inode.size - offset)
        try checkTransfer(end - offset, "a read")
        var out: [UInt8] = []
        out.reserveCapacity(Int(end - offset))
        for c in PageChunks(start: offset, count: end - offset) {
            if let pfn = inode.pages[c.page] {
                phys.read(pfn, offset: c.offsetInPage, count: c.length, into: &out)
            } else {
                out.append(contentsOf: repeatElement(0, count: c.length))
            }
        }
        return out
    }

    mutating func shmemWrite(_ ino: UInt64, offset: UInt64, _ bytes: [UInt8]) throws(Errno) {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(bytes.count))
        if overflow || end > UAPI.MAX_LFS_FILESIZE { throw .EFBIG }
        for c in PageChunks(start: offset, count: UInt64(bytes.count)) {
            let pfn = shmemGetPage(ino, pgoff: c.page)
            phys.write(pfn, offset: c.offsetInPage, bytes[c.range])
        }
        if end > shmemInodes[ino]!.size { shmemInodes[ino]!.size = end }
    }

    /// shmem_fallocate(): allocate (growing i_size without KEEP_SIZE) or punch.
    mutating func shmemFallocate(_ ino: UInt64, mode: UInt32, offset: UInt64, length: UInt64) throws(Errno) {
        if mode & ~(UAPI.FALLOC_FL_KEEP_SIZE | UAPI.FALLOC_FL_PUNCH_HOLE) != 0 { throw .EOPNOTSUPP }
        let end = offset + length
        if mode & UAPI.FALLOC_FL_PUNCH_HOLE != 0 {
            // shmem_truncate_range() over the whole hole: pages fallocated past EOF go too.
            shmemZeroRange(ino, offset: offset, end: end, evenCows: false)
            return
        }
        // shmem_fallocate() allocates every page now; the model marks the range and
        // gives a page its frame when it is first touched (its bytes are zero until then).
        let first = offset >> UAPI.pageShift
        let last = (end + UAPI.pageSize - 1) >> UAPI.pageShift
        // Pages already fallocated become uptodate; holes become fallocated.
        for run in shmemInodes[ino]!.state.runs(in: first..<last) where run.value != .uptodate {
            shmemInodes[ino]!.state.set(run.range, to: run.value == .hole ? .fallocated : .uptodate)
        }
        if mode & UAPI.FALLOC_FL_KEEP_SIZE == 0 && end > shmemInodes[ino]!.size {
            shmemInodes[ino]!.size = end
        }
    }

    /// Punches whole pages out (unmapping them first) and zeroes partial ones.
    mutating func shmemZeroRange(_ ino: UInt64, offset: UInt64, end: UInt64, evenCows: Bool = true) {
        guard offset < end else { return }
        let firstWhole = (offset + UAPI.pageSize - 1) >> UAPI.pageShift
        let lastWhole = end >> UAPI.pageShift
        if firstWhole < lastWhole {
            let whole = firstWhole..<lastWhole
            unmapMappingRange(.shmem(ino), pgoffs: whole, evenCows: evenCows)
            // Visit the frames in the range, or the range, whichever is smaller.
            let victims = UInt64(shmemInodes[ino]!.pages.count) < UInt64(whole.count)
                ? shmemInodes[ino]!.pages.keys.filter { whole.contains($0) } : Array(whole)
            for pgoff in victims {
                if let pfn = shmemInodes[ino]!.pages.removeValue(forKey: pgoff) { phys.put(pfn) }
            }
            shmemInodes[ino]!.state.set(whole, to: .hole)
        }
        // Partial pages at either end keep their frame and lose the bytes in range.
        for (from, to) in [(offset, min(end, firstWhole << UAPI.pageShift)), (max(offset, lastWhole << UAPI.pageShift), end)]
        where from < to {
            if let pfn = shmemInodes[ino]!.pages[from >> UAPI.pageShift] {
                let inPage = Int(from & (UAPI.pageSize - 1))
                phys.write(pfn, offset: inPage, [UInt8](repeating: 0, count: Int(to - from))[...])
            }
        }
    }

    /// shmem_setattr() to a new size: any size up to the old one (the same size too)
    /// truncates everything past the new EOF, pages fallocated with KEEP_SIZE beyond
    /// the old one included; growing keeps them.
    mutating func shmemTruncate(_ ino: UInt64, size: UInt64) {
        if size <= shmemInodes[ino]!.size {
            let end = UInt64.max & ~(UAPI.pageSize - 1)
            shmemZeroRange(ino, offset: size, end: end)
        }
        shmemInodes[ino]!.size = size
    }

    /// shmem_file_llseek() with SEEK_DATA or SEEK_HOLE: the next byte at or after
    /// `offset` in a page that holds data (uptodate: written, faulted, or fallocated
    /// twice; a page fallocated once is not, and counts as a hole), or in one that does not; EOF counts as
    /// a hole. An offset outside [0, i_size) is ENXIO, and so is SEEK_DATA with no data
    /// after it.
    ///
    /// - Complexity: O(log r + k) for the k runs of `state` it passes.
    func shmemSeekData(_ ino: UInt64, offset: Int64, hole: Bool) throws(Errno) -> UInt64 {
        let inode = shmemInodes[ino]!
        guard offset >= 0, UInt64(offset) < inode.size else { throw .ENXIO }
        let start = UInt64(offset)
        let pages = (inode.size + UAPI.pageSize - 1) >> UAPI.pageShift
        guard let page = inode.state.firstIndex(in: (start >> UAPI.pageShift)..<pages, where: { ($0 == .uptodate) != hole }) else {
            if hole { return inode.size }
            throw .ENXIO
        }
        return min(max(page << UAPI.pageShift, start), inode.size)
    }
}
