import GMemBackend

/// A shmem inode behind memfd_create(2): ordinary shared memory with read/write.
struct ShmemInode: Hashable {
    var size: UInt64
    var pages: [UInt64: UInt64] = [:]
    var refs = 1
    /// secretmem: not in the kernel's direct map, so GUP refuses it (EFAULT).
    var secret = false
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
        return pfn
    }

    func shmemRead(_ ino: UInt64, offset: UInt64, count: UInt64) -> [UInt8] {
        let inode = shmemInodes[ino]!
        guard offset < inode.size else { return [] }
        let end = offset + min(count, inode.size - offset)
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
            shmemZeroRange(ino, offset: offset, end: min(end, shmemInodes[ino]!.size))
            return
        }
        let first = offset >> UAPI.pageShift
        let last = (end + UAPI.pageSize - 1) >> UAPI.pageShift
        for pgoff in first..<last { _ = shmemGetPage(ino, pgoff: pgoff) }
        if mode & UAPI.FALLOC_FL_KEEP_SIZE == 0 && end > shmemInodes[ino]!.size {
            shmemInodes[ino]!.size = end
        }
    }

    /// Punches whole pages out (unmapping them first) and zeroes partial ones.
    mutating func shmemZeroRange(_ ino: UInt64, offset: UInt64, end: UInt64) {
        guard offset < end else { return }
        let firstWhole = (offset + UAPI.pageSize - 1) >> UAPI.pageShift
        let lastWhole = end >> UAPI.pageShift
        if firstWhole < lastWhole {
            unmapMappingRange(.shmem(ino), pgoffs: firstWhole..<lastWhole)
            for pgoff in firstWhole..<lastWhole {
                if let pfn = shmemInodes[ino]!.pages.removeValue(forKey: pgoff) { phys.put(pfn) }
            }
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

    mutating func shmemTruncate(_ ino: UInt64, size: UInt64) {
        let old = shmemInodes[ino]!.size
        if size < old {
            shmemZeroRange(ino, offset: size, end: (old + UAPI.pageSize - 1) & ~(UAPI.pageSize - 1))
        }
        shmemInodes[ino]!.size = size
    }
}
