/// Guest work described as data: the same program compiles to x86-64 for a real vCPU
/// and is interpreted by the model, and both produce the same trace of events.
public struct GuestProgram: Hashable, Sendable {
    public enum Op: Hashable, Sendable {
        /// Store `pattern`, repeated, over [gpa, gpa + length).
        case fill(gpa: UInt64, length: UInt64, pattern: [UInt8])
        /// Compare [gpa, gpa + length) with `pattern` repeated; the event says where
        /// the first difference is.
        case verify(gpa: UInt64, length: UInt64, pattern: [UInt8])
        /// Tell the VMM a value (a progress marker): one port-I/O exit.
        case report(UInt32)
        /// Ask the VMM to convert pages, as a guest kernel does before sharing or after
        /// unsharing memory.
        case convert(ConversionRequest)
    }

    public var ops: [Op]
    /// The privilege the program runs at: 3 (user, the default: what runs natively
    /// everywhere) or 0 (kernel: where KVM forwards hypercalls).
    public var cpl: Int
    public init(_ ops: [Op], cpl: Int = 3) {
        self.ops = ops
        self.cpl = cpl
    }
}

/// How a guest asks for a conversion.
public enum ConversionChannel: String, Hashable, Sendable {
    /// A port-I/O doorbell: the guest writes gpa, npages and flags (1: to-private) to a
    /// mailbox and executes `in eax, 0x12`; the VMM reads the mailbox and answers in
    /// the exit's data, which the CPU loads into EAX (32 bits, zero-extended: -22 reads
    /// 0xffffffea). One exit, no register ioctls. Works wherever guest code runs,
    /// including kvm-pvm hosts.
    case doorbell
    /// KVM_HC_MAP_GPA_RANGE (nr 12): RBX = gpa, RCX = npages, RDX = attributes
    /// (bit 4: encrypted, i.e. private). KVM answers itself when the guest is not at
    /// CPL0 (-KVM_EPERM) or the exit is not enabled (-KVM_ENOSYS), or the arguments
    /// are bad (-KVM_EINVAL); otherwise the VMM gets KVM_EXIT_HYPERCALL.
    case hypercall
    /// A KVM_EXIT_MEMORY_FAULT taken as an implicit request (SNP/TDX guests touch the
    /// side they want and expect the VMM to follow).
    case memoryFault = "memory_fault"
}

/// A guest's conversion request.
public struct ConversionRequest: Hashable, Sendable {
    public var gpa: UInt64
    public var npages: UInt64
    public var toPrivate: Bool
    public var channel: ConversionChannel
    public init(gpa: UInt64, npages: UInt64, toPrivate: Bool, channel: ConversionChannel) {
        self.gpa = gpa
        self.npages = npages
        self.toPrivate = toPrivate
        self.channel = channel
    }
}

/// What happened while a guest program ran, in order.
public enum GuestEvent: Hashable, Sendable {
    case reported(UInt32)
    /// `mismatchAt` is the offset of the first differing byte, nil if all matched.
    case verified(gpa: UInt64, length: UInt64, mismatchAt: UInt64?)
    /// The request, and the value the guest received in RAX.
    case conversion(ConversionRequest, result: UInt64)
}

/// The whole run: the events, then how it ended (`.completed([])` when the program
/// ran to its end; an exit or a failed KVM_RUN otherwise).
public struct GuestProgramResult: Hashable, Sendable {
    public var events: [GuestEvent]
    public var end: GuestOutcome
    public init(events: [GuestEvent], end: GuestOutcome) {
        self.events = events
        self.end = end
    }
}

/// KVM's hypercall return values as the guest sees them (include/uapi/linux/kvm_para.h).
public enum KVMHypercallResult {
    public static let EPERM = UInt64(bitPattern: -1)
    public static let EINVAL = UInt64(bitPattern: -22)
    public static let ENOSYS = UInt64(bitPattern: -1000)
}

extension GuestProgram {
    /// `pattern` repeated to `length` bytes: what `fill` stores and `verify` expects.
    public static func expand(_ pattern: [UInt8], to length: UInt64) -> [UInt8] {
        guard !pattern.isEmpty else { return [UInt8](repeating: 0, count: Int(length)) }
        if pattern.count == 1 { return [UInt8](repeating: pattern[0], count: Int(length)) }
        return (0..<Int(length)).map { pattern[$0 % pattern.count] }
    }

    /// The bytes the program's fills and verifies need, in total.
    public var dataSize: UInt64 {
        ops.reduce(0) { sum, op in
            switch op {
            case .fill(_, let n, _), .verify(_, let n, _): sum + n
            default: sum
            }
        }
    }
}

extension ConversionRequest {
    /// What KVM answers a KVM_HC_MAP_GPA_RANGE itself, before any exit, or nil when it
    /// would forward the call (x86 kvm_emulate_hypercall / complete_hypercall_exit).
    public func kvmHypercallAnswer(cpl: Int, exitEnabled: Bool) -> UInt64? {
        if cpl != 0 { return KVMHypercallResult.EPERM }
        if !exitEnabled { return KVMHypercallResult.ENOSYS }
        let (end, overflow) = (gpa >> 12).addingReportingOverflow(npages)
        if gpa & 0xfff != 0 || npages == 0 || overflow || end < gpa >> 12 { return KVMHypercallResult.EINVAL }
        return nil
    }
}
