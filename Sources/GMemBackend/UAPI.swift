/// Constants of the KVM and mm uapi, with the kernel's values (include/uapi/linux/kvm.h,
/// linux/falloc.h, asm-generic/mman-common.h).
public enum UAPI {
    public static let pageSize: UInt64 = 4096
    public static let pageShift: UInt64 = 12

    // KVM_CREATE_GUEST_MEMFD flags.
    public static let GUEST_MEMFD_FLAG_MMAP: UInt64 = 1 << 0
    public static let GUEST_MEMFD_FLAG_INIT_SHARED: UInt64 = 1 << 1
    /// The in-flight NO_DIRECT_MAP series: pages leave the kernel's direct map.
    public static let GUEST_MEMFD_FLAG_NO_DIRECT_MAP: UInt64 = 1 << 2

    // kvm_userspace_memory_region2.flags.
    public static let KVM_MEM_LOG_DIRTY_PAGES: UInt32 = 1 << 0
    public static let KVM_MEM_READONLY: UInt32 = 1 << 1
    public static let KVM_MEM_GUEST_MEMFD: UInt32 = 1 << 2

    // Memory attributes and memory-fault exit flags.
    public static let KVM_MEMORY_ATTRIBUTE_PRIVATE: UInt64 = 1 << 3
    public static let KVM_MEMORY_EXIT_FLAG_PRIVATE: UInt64 = 1 << 3

    // fallocate(2) modes.
    public static let FALLOC_FL_KEEP_SIZE: UInt32 = 0x01
    public static let FALLOC_FL_PUNCH_HOLE: UInt32 = 0x02
    public static let FALLOC_FL_NO_HIDE_STALE: UInt32 = 0x04
    public static let FALLOC_FL_COLLAPSE_RANGE: UInt32 = 0x08
    public static let FALLOC_FL_ZERO_RANGE: UInt32 = 0x10
    public static let FALLOC_FL_INSERT_RANGE: UInt32 = 0x20
    public static let FALLOC_FL_UNSHARE_RANGE: UInt32 = 0x40
    public static let FALLOC_FL_WRITE_ZEROES: UInt32 = 0x80

    // lseek(2) whence.
    public static let SEEK_SET: Int32 = 0
    public static let SEEK_CUR: Int32 = 1
    public static let SEEK_END: Int32 = 2
    public static let SEEK_DATA: Int32 = 3
    public static let SEEK_HOLE: Int32 = 4

    // KVM_CREATE_VM types (x86).
    public static let KVM_X86_DEFAULT_VM: UInt64 = 0
    public static let KVM_X86_SW_PROTECTED_VM: UInt64 = 1
    public static let KVM_X86_SEV_VM: UInt64 = 2
    public static let KVM_X86_SEV_ES_VM: UInt64 = 3
    public static let KVM_X86_SNP_VM: UInt64 = 4
    public static let KVM_X86_TDX_VM: UInt64 = 5

    /// KVM_USER_MEM_SLOTS on x86: slot ids 0..32763.
    public static let KVM_USER_MEM_SLOTS: UInt32 = 32764
    /// KVM_MEM_MAX_NR_PAGES: a memslot holds at most 2^31 - 1 pages.
    public static let KVM_MEM_MAX_NR_PAGES: UInt64 = (1 << 31) - 1
    /// The largest user address plus one on x86-64 with 4-level paging (TASK_SIZE_MAX).
    public static let TASK_SIZE_MAX: UInt64 = (1 << 47) - pageSize
    /// MAX_LFS_FILESIZE, the s_maxbytes of guest_memfd's pseudo filesystem.
    public static let MAX_LFS_FILESIZE: UInt64 = UInt64(Int64.max)

    public static let KVM_HC_MAP_GPA_RANGE: UInt64 = 12
}

/// The KVM capabilities a scenario can ask KVM_CHECK_EXTENSION about.
public enum Capability: String, CaseIterable, Sendable {
    case userMemory = "user_memory"
    case nrMemslots = "nr_memslots"
    case exitHypercall = "exit_hypercall"
    case userMemory2 = "user_memory2"
    case memoryFaultInfo = "memory_fault_info"
    case memoryAttributes = "memory_attributes"
    case guestMemfd = "guest_memfd"
    case vmTypes = "vm_types"
    case preFaultMemory = "pre_fault_memory"
    case guestMemfdFlags = "guest_memfd_flags"
    case readonlyMem = "readonly_mem"
    case guestMemfdMemoryAttributes = "guest_memfd_memory_attributes"
    case maxVCPUID = "max_vcpu_id"

    /// The KVM_CAP_* number.
    public var number: UInt32 {
        switch self {
        case .userMemory: 3
        case .nrMemslots: 10
        case .readonlyMem: 81
        case .maxVCPUID: 128
        case .exitHypercall: 201
        case .userMemory2: 231
        case .memoryFaultInfo: 232
        case .memoryAttributes: 233
        case .guestMemfd: 234
        case .vmTypes: 235
        case .preFaultMemory: 236
        case .guestMemfdFlags: 244
        // 250 from the in-place series' v8 (249 became KVM_CAP_S390_HPAGE_2G); the number
        // in the series as applied to linux-next (v13) is not confirmed.
        case .guestMemfdMemoryAttributes: 250
        }
    }
}

/// KVM_CREATE_VM types as scenario files name them.
public enum VMType: String, CaseIterable, Sendable {
    case `default` = "default"
    case swProtected = "sw_protected"
    case sev = "sev"
    case sevES = "sev_es"
    case snp = "snp"
    case tdx = "tdx"

    public var number: UInt64 {
        switch self {
        case .default: UAPI.KVM_X86_DEFAULT_VM
        case .swProtected: UAPI.KVM_X86_SW_PROTECTED_VM
        case .sev: UAPI.KVM_X86_SEV_VM
        case .sevES: UAPI.KVM_X86_SEV_ES_VM
        case .snp: UAPI.KVM_X86_SNP_VM
        case .tdx: UAPI.KVM_X86_TDX_VM
        }
    }
}
