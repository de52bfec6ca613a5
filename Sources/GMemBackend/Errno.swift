/// A Linux errno, with the kernel's number and name on every platform.
///
/// The model reports the errno Linux reports; it never uses the host's `errno.h`
/// values, so a scenario run on macOS still says `EHWPOISON` (133).
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    /// The errno value as Linux numbers it (asm-generic/errno-base.h, errno.h).
    public let rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    public var name: String { Errno.names[rawValue] ?? "E\(rawValue)" }
    public var description: String { name }

    public static let EPERM = Errno(rawValue: 1)
    public static let ENOENT = Errno(rawValue: 2)
    public static let ESRCH = Errno(rawValue: 3)
    public static let EINTR = Errno(rawValue: 4)
    public static let EIO = Errno(rawValue: 5)
    public static let ENXIO = Errno(rawValue: 6)
    public static let E2BIG = Errno(rawValue: 7)
    public static let EBADF = Errno(rawValue: 9)
    public static let EAGAIN = Errno(rawValue: 11)
    public static let ENOMEM = Errno(rawValue: 12)
    public static let EACCES = Errno(rawValue: 13)
    public static let EFAULT = Errno(rawValue: 14)
    public static let EBUSY = Errno(rawValue: 16)
    public static let EEXIST = Errno(rawValue: 17)
    public static let EXDEV = Errno(rawValue: 18)
    public static let ENODEV = Errno(rawValue: 19)
    public static let EISDIR = Errno(rawValue: 21)
    public static let EINVAL = Errno(rawValue: 22)
    public static let EMFILE = Errno(rawValue: 24)
    public static let ENOTTY = Errno(rawValue: 25)
    public static let EFBIG = Errno(rawValue: 27)
    public static let ENOSPC = Errno(rawValue: 28)
    public static let ESPIPE = Errno(rawValue: 29)
    public static let ERANGE = Errno(rawValue: 34)
    public static let ENOSYS = Errno(rawValue: 38)
    public static let EOVERFLOW = Errno(rawValue: 75)
    public static let EOPNOTSUPP = Errno(rawValue: 95)
    public static let EHWPOISON = Errno(rawValue: 133)

    static let names: [Int32: String] = [
        1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 9: "EBADF",
        11: "EAGAIN", 12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST",
        18: "EXDEV", 19: "ENODEV", 21: "EISDIR", 22: "EINVAL", 24: "EMFILE", 25: "ENOTTY",
        27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 34: "ERANGE", 38: "ENOSYS", 75: "EOVERFLOW",
        95: "EOPNOTSUPP", 133: "EHWPOISON",
    ]

    /// Looks an errno up by name (`"EINVAL"`), as scenario files spell them.
    public init?(name: String) {
        guard let entry = Errno.names.first(where: { $0.value == name }) else { return nil }
        self.rawValue = entry.key
    }

    public static var allNames: [String] { names.values.sorted() }
}

extension Errno {
    /// Not a Linux errno: the model refused a step because it would exceed one of the
    /// model's own limits (a result too large to hold, an allocation over its memory).
    /// Backends turn it into `BackendError.unsupported` with the limit named.
    public static let modelLimit = Errno(rawValue: 4095)
}

/// Bounds that keep every step's cost proportional to what it touches.
public enum Limits {
    /// MAX_RW_COUNT: read(2) and write(2) move at most INT_MAX & PAGE_MASK bytes a call.
    public static let maxRWCount: UInt64 = 0x7fff_f000
    /// The most bytes one step may return (a read, a host or guest access, a DMA)
    /// unless raised (`--max-transfer`): larger results are refused, not attempted.
    public static let defaultTransfer: UInt64 = 1 << 30

    /// Why a transfer of `count` bytes is refused under `limit`, or nil.
    public static func transferRefusal(_ count: UInt64, limit: UInt64, what: String) -> String? {
        guard count > limit else { return nil }
        return "\(what) of \(count) bytes is over the transfer limit of \(limit) bytes (--max-transfer raises it)"
    }
}
