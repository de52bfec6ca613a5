import GMemBackend

/// Bookkeeping that is not part of the system's state (statistics): two kernels that
/// differ only in it are the same state to the explorer's hashing and equality.
@propertyWrapper
struct Bookkeeping<Value>: Hashable {
    var wrappedValue: Value
    init(wrappedValue: Value) { self.wrappedValue = wrappedValue }
    static func == (_: Self, _: Self) -> Bool { true }
    func hash(into _: inout Hasher) {}
}

/// A page's bytes, shared between snapshots of the kernel until one of them writes,
/// with a digest computed the first time the page is hashed and dropped when the
/// bytes change: the explorer hashes every state it reaches, and feeding each page
/// to the hasher there was half of its time, while a write must stay cheap.
///
/// Not Sendable, and neither is the `Kernel` holding it, so Swift 6 keeps a snapshot
/// on one thread at a time: the cache needs no lock.
final class PageBytes {
    /// Mutated only through a uniquely referenced box (`Frame.write`).
    @exclusivity(unchecked) fileprivate(set) var bytes: [UInt8]
    @exclusivity(unchecked) private var cachedDigest: Int?

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var digest: Int {
        if let cachedDigest { return cachedDigest }
        var h = Hasher()
        bytes.withUnsafeBytes { h.combine(bytes: $0) }
        let d = h.finalize()
        cachedDigest = d
        return d
    }

    fileprivate func forgetDigest() { cachedDigest = nil }
}

/// One physical page frame: its bytes and the counts the kernel keeps in struct page.
struct Frame: Hashable {
    /// The page's bytes; nil means all zero, so untouched memory costs nothing.
    private var storage: PageBytes?
    /// References: the page cache holds one, each host PTE one, each GUP pin one.
    var refcount: Int32 = 1
    /// Host page-table entries that map the frame.
    var mapcount: Int32 = 0
    /// GUP pins (FOLL_PIN); each pin also holds a reference.
    var pincount: Int32 = 0
    /// memory_failure() marked the frame poisoned.
    var hwpoison = false
    /// The guest_memfd page this frame was allocated for (page->mapping and
    /// page->index): a hint for reverse lookups, current only while that page
    /// cache entry still names this frame.
    var gmemOwner: GmemPageRef?

    /// The page's bytes; nil means all zero.
    var data: [UInt8]? {
        get { storage?.bytes }
        set { storage = newValue.map(PageBytes.init) }
    }

    /// Copies `bytes` in at `offset`: in place when no snapshot shares the page,
    /// otherwise into a copy (value semantics for the kernel's snapshots).
    mutating func write(offset: Int, _ bytes: ArraySlice<UInt8>) {
        if storage == nil {
            if bytes.allSatisfy({ $0 == 0 }) { return }
            storage = PageBytes([UInt8](repeating: 0, count: PhysicalMemory.pageSize))
        } else if !isKnownUniquelyReferenced(&storage!) {
            storage = PageBytes(storage!.bytes)
        }
        storage!.bytes.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        storage!.forgetDigest()
    }

    func hash(into hasher: inout Hasher) {
        hasher.combine(storage?.digest ?? 0)
        hasher.combine(refcount)
        hasher.combine(mapcount)
        hasher.combine(pincount)
        hasher.combine(hwpoison)
        hasher.combine(gmemOwner)
    }

    /// Whether the two frames hold the same bytes.
    ///
    /// - Complexity: O(1) when the bytes are shared or their digests differ; else
    ///   O(page size).
    func sameBytes(as other: Frame) -> Bool {
        switch (storage, other.storage) {
        case (nil, nil): return true
        case let (x?, y?): return x === y || (x.digest == y.digest && x.bytes == y.bytes)
        default: return false
        }
    }

    /// - Complexity: O(1) when the bytes are shared or their digests differ; else
    ///   O(page size).
    static func == (a: Frame, b: Frame) -> Bool {
        guard a.refcount == b.refcount, a.mapcount == b.mapcount, a.pincount == b.pincount, a.hwpoison == b.hwpoison,
            a.gmemOwner == b.gmemOwner
        else {
            return false
        }
        return a.sameBytes(as: b)
    }
}

/// The host's physical memory: frames by page frame number, allocated on demand.
///
/// A frame exists only while something references it (a page cache, a PTE), and
/// its bytes only once something non-zero was written to it.
struct PhysicalMemory: Hashable {
    private(set) var frames = PageMap<Frame>()
    private var nextPFN: UInt64 = 0x100
    /// Pages cleared and pages copied, for the policy comparison.
    @Bookkeeping private(set) var pagesZeroed = 0
    @Bookkeeping private(set) var pagesCopied = 0

    static let pageSize = Int(UAPI.pageSize)

    /// Allocates a frame with one reference and unspecified (here: zero) contents.
    mutating func allocate() -> UInt64 {
        let pfn = nextPFN
        nextPFN += 1
        frames[pfn] = Frame()
        return pfn
    }

    /// get_page(): takes a reference.
    mutating func get(_ pfn: UInt64) {
        frames[pfn]!.refcount += 1
    }

    /// put_page(): drops a reference and frees the frame at zero.
    mutating func put(_ pfn: UInt64) {
        let left = frames[pfn]!.refcount - 1
        if left == 0 {
            frames[pfn] = nil
        } else {
            frames[pfn]!.refcount = left
        }
    }

    subscript(pfn: UInt64) -> Frame {
        get { frames[pfn]! }
        set { frames[pfn] = newValue }
    }

    func contains(_ pfn: UInt64) -> Bool { frames[pfn] != nil }

    /// clear_highpage().
    mutating func zero(_ pfn: UInt64) {
        frames[pfn]!.data = nil
        pagesZeroed += 1
    }

    /// Copies `count` bytes at `offset` within the frame into `out`.
    /// A frame that was freed reads as zeros and drops writes: only a stale mapping (a
    /// missed invalidation, which the invariant checker reports as incoherent) can
    /// reach one, and on hardware it would reach whatever reused the page.
    func read(_ pfn: UInt64, offset: Int, count: Int, into out: inout [UInt8]) {
        if let data = frames[pfn]?.data {
            out.append(contentsOf: data[offset..<offset + count])
        } else {
            out.append(contentsOf: Self.zeroPage[0..<count])
        }
    }

    /// A page of zeros to copy from (a bulk copy, not a per-byte loop).
    static let zeroPage = [UInt8](repeating: 0, count: pageSize)

    /// Copies `bytes` into the frame at `offset`.
    mutating func write(_ pfn: UInt64, offset: Int, _ bytes: ArraySlice<UInt8>) {
        guard frames[pfn] != nil else { return }
        frames[pfn]!.write(offset: offset, bytes)
    }

    /// Copies one frame's contents into another (COW, migration).
    mutating func copy(from source: UInt64, to destination: UInt64) {
        frames[destination]!.data = frames[source]!.data
        pagesCopied += 1
    }

    /// Frames currently allocated.
    var allocatedFrames: Int { frames.count }
}

/// The pieces of `[start, start + count)` cut at page boundaries, in order: how every
/// copy loop in the model (host memcpy, guest access, shmem read/write) walks memory.
/// The caller checks that the range does not wrap.
struct PageChunks: Sequence, IteratorProtocol {
    struct Chunk {
        /// Address (or file offset) of the chunk's first byte.
        var address: UInt64
        /// The page's number (address >> PAGE_SHIFT).
        var page: UInt64 { address >> UAPI.pageShift }
        /// Offset of the chunk within its page.
        var offsetInPage: Int
        var length: Int
        /// Bytes before this chunk.
        var done: Int
        var range: Range<Int> { done..<done + length }
    }

    private var address: UInt64
    private let end: UInt64
    private var done = 0

    init(start: UInt64, count: UInt64) {
        address = start
        end = start &+ count
    }

    mutating func next() -> Chunk? {
        guard address < end else { return nil }
        let inPage = Int(address & (UAPI.pageSize - 1))
        let n = Swift.min(Int(UAPI.pageSize) - inPage, Int(end - address))
        defer {
            address += UInt64(n)
            done += n
        }
        return Chunk(address: address, offsetInPage: inPage, length: n, done: done)
    }
}
