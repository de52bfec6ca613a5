import GMemBackend
import GMemScenario

@testable import GMemModel

/// The repository root, found from this file's path.
let repositoryRoot: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3)  // Tests/GuestMemfdTests/Support.swift
    return parts.joined(separator: "/")
}()

extension Kernel {
    /// A VM of `type` and a guest_memfd of `size` with `flags` on it.
    mutating func vmWithGmem(type: VMType = .default, size: UInt64 = 1 << 21, flags: UInt64 = 0)
        throws(Errno) -> (vm: Int32, gmem: Int32)
    {
        let vm = try createVM(type: type.number)
        let gmem = try createGuestMemfd(on: vm, size: size, flags: flags)
        return (vm, gmem)
    }
}

/// The errno a throwing call produced, or nil on success.
func errnoOf<T>(_ body: () throws(Errno) -> T) -> Errno? {
    do {
        _ = try body()
        return nil
    } catch {
        return error
    }
}

let K: UInt64 = 1 << 10
let M: UInt64 = 1 << 20
let G: UInt64 = 1 << 30
let MMAP = UAPI.GUEST_MEMFD_FLAG_MMAP
let INIT_SHARED = UAPI.GUEST_MEMFD_FLAG_INIT_SHARED
let KEEP: UInt32 = UAPI.FALLOC_FL_KEEP_SIZE
let PUNCH: UInt32 = UAPI.FALLOC_FL_PUNCH_HOLE
