#if os(Linux)
import CKVM
import GMemBackend
import Glibc

/// What one kernel backend lets the real kernel allocate, so that no scenario or
/// fuzz sequence can take the machine down: every call that could make the kernel
/// allocate memory (fallocate, host and guest accesses that fault pages in,
/// pre-faults, writes) is charged before it is made and refused, naming the limit,
/// when the charge would pass the budget. Charges are upper bounds and are never
/// given back while the backend lives; everything is released when it goes.
public struct MemoryBudget: Sendable {
    /// Bytes this backend may make the kernel allocate.
    public var limit: UInt64
    /// Bytes charged so far.
    public private(set) var charged: UInt64 = 0

    public init(limit: UInt64) { self.limit = limit }

    /// The default: a quarter of MemAvailable (/proc/meminfo), at most 8 GiB; 1 GiB if
    /// it cannot be read.
    public static var defaultLimit: UInt64 {
        min(availableBytes().map { $0 / 4 } ?? (1 << 30), 8 << 30)
    }

    /// MemAvailable from /proc/meminfo, in bytes.
    public static func availableBytes() -> UInt64? { meminfo("MemAvailable") }

    /// What the overcommit heuristic lets a private writable mapping commit: RAM +
    /// swap (overcommit_memory 0 or 2), unlimited with overcommit_memory 1.
    public static func commitLimit() -> UInt64 {
        if firstLine("/proc/sys/vm/overcommit_memory") == "1" { return UInt64.max }
        return (meminfo("MemTotal") ?? (64 << 30)) + (meminfo("SwapTotal") ?? 0)
    }

    /// A /proc/meminfo field, in bytes.
    static func meminfo(_ field: String) -> UInt64? {
        guard let f = fopen("/proc/meminfo", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard text.hasPrefix(field + ":") else { continue }
            return UInt64(text.dropFirst(field.count + 1).filter(\.isNumber)).map { $0 * 1024 }
        }
        return nil
    }

    /// The first line of a small file, without its newline.
    static func firstLine(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 64)
        guard fgets(&line, Int32(line.count), f) != nil else { return nil }
        return String(decoding: line.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Charges `bytes` for `what`, or says why not (the budget left and the flag).
    public mutating func charge(_ bytes: UInt64, _ what: String) throws(BackendError) {
        guard bytes > 0 else { return }
        let (total, overflow) = charged.addingReportingOverflow(bytes)
        if overflow || total > limit {
            throw .unsupported(
                "\(what) could make the kernel allocate \(bytes) bytes; this run's memory budget has \(limit - min(charged, limit)) of \(limit) bytes left (--memory-budget raises it)")
        }
        charged = total
    }
}

/// Where the backend's own mappings go (the guest harness, vCPUs' kvm_run pages, large
/// read buffers): a region far below the mmap base, so none lands in a range a
/// scenario just unmapped while a memslot still names it (that memslot must keep
/// faulting, as in a VMM). The kernel honours a free hint and picks elsewhere if not.
enum OwnMappings {
    nonisolated(unsafe) private static var cursor: UInt64 = 0x2000_0000_0000

    static func hint(_ length: UInt64) -> UnsafeMutableRawPointer? {
        defer { cursor &+= ((length + (1 << 21) - 1) & ~((1 << 21) - 1)) + (1 << 21) }
        return UnsafeMutableRawPointer(bitPattern: UInt(cursor))
    }
}

/// The host mappings a backend made, so that it can unmap what a scenario left
/// mapped when it is done: [address, address + length) ranges, split on munmap.
struct MappingLedger {
    private(set) var ranges: [(address: UInt64, length: UInt64)] = []

    mutating func add(_ address: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        ranges.append((address, (length + 4095) & ~4095))
    }

    /// Forgets [address, address + length): a scenario unmapped it, and the address
    /// may be reused by anything (the allocator too), so it must not be unmapped again.
    mutating func remove(_ address: UInt64, _ length: UInt64) {
        let (end, overflow) = address.addingReportingOverflow((length + 4095) & ~4095)
        let hi = overflow ? UInt64.max : end
        var out: [(address: UInt64, length: UInt64)] = []
        for r in ranges {
            let rEnd = r.address + r.length
            if rEnd <= address || r.address >= hi {
                out.append(r)
                continue
            }
            if r.address < address { out.append((r.address, address - r.address)) }
            if rEnd > hi { out.append((hi, rEnd - hi)) }
        }
        ranges = out
    }

    /// Unmaps every range still recorded.
    mutating func releaseAll() {
        for r in ranges { _ = ckvm_munmap(r.address, r.length) }
        ranges = []
    }
}
#endif

#if os(Linux)
/// A memory cgroup of the process's own (cgroup v1 memory controller, or cgroup v2),
/// with a limit, so that if the real kernel were made to allocate past every budget
/// the OOM killer would stop this process and not a neighbour. Entered once per
/// process; on exit the process moves back and the group is removed.
public enum MemoryCgroup {
    nonisolated(unsafe) private static var created: String?
    nonisolated(unsafe) private static var parent: String?

    /// Moves this process into a new child memory cgroup limited to `limit` bytes;
    /// what it did, or nil (with why) when no writable memory controller exists.
    public static func enter(limit: UInt64) -> Result<String, CgroupProblem> {
        if let created { return .success(created) }
        guard let base = ownGroup() else { return .failure(CgroupProblem(message: "no memory cgroup controller is mounted")) }
        let dir = base.path + "/gmem-\(getpid())"
        guard mkdir(dir, 0o755) == 0 || errno == EEXIST else {
            return .failure(CgroupProblem(message: "cannot create \(dir): \(String(cString: strerror(errno)))"))
        }
        let limitFile = dir + (base.v2 ? "/memory.max" : "/memory.limit_in_bytes")
        guard write(String(limit), to: limitFile), write(String(getpid()), to: dir + "/cgroup.procs") else {
            rmdir(dir)
            return .failure(CgroupProblem(message: "cannot set a limit or join \(dir)"))
        }
        created = dir
        parent = base.path
        atexit {
            guard let dir = MemoryCgroup.created, let parent = MemoryCgroup.parent else { return }
            _ = MemoryCgroup.write(String(getpid()), to: parent + "/cgroup.procs")
            rmdir(dir)
        }
        return .success(dir)
    }

    public struct CgroupProblem: Error { public var message: String }

    /// The directory of this process's memory cgroup: v1's memory hierarchy, else v2's.
    static func ownGroup() -> (path: String, v2: Bool)? {
        guard let f = fopen("/proc/self/cgroup", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 512)
        var v2Path: String?
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let parts = text.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            if parts[1].split(separator: ",").contains("memory"), access("/sys/fs/cgroup/memory" + parts[2], W_OK) == 0 {
                return ("/sys/fs/cgroup/memory" + parts[2], false)
            }
            if parts[0] == "0" { v2Path = String(parts[2]) }
        }
        if let p = v2Path, access("/sys/fs/cgroup" + p + "/cgroup.controllers", R_OK) == 0,
            MemoryBudget.firstLine("/sys/fs/cgroup" + p + "/cgroup.controllers")?.split(separator: " ").contains("memory") == true
        {
            return ("/sys/fs/cgroup" + p, true)
        }
        return nil
    }

    static func write(_ text: String, to path: String) -> Bool {
        guard let f = fopen(path, "w") else { return false }
        let ok = fputs(text, f) >= 0
        return fclose(f) == 0 && ok
    }
}
#endif
