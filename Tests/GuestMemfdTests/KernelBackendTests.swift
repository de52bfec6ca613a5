#if os(Linux)
import CKVM
import GMemBackend
import GMemModel
import GMemScenario
import Glibc
import Testing

@testable import GMemKernel

/// Why the kernel tests cannot run here, or nil where /dev/kvm with guest_memfd opens.
let kvmUnavailable = KernelBackend.unavailableReason()

@Suite("Kernel backend", .enabled(if: kvmUnavailable == nil, Comment(rawValue: "needs /dev/kvm with guest_memfd: \(kvmUnavailable ?? "")")), .serialized)
struct KernelBackendTests {
    /// The model, configured as the host it is compared with.
    static func matchingModel(_ k: KernelBackend) -> ModelBackend {
        ModelBackend(config: .standing(for: k.hostProfile), checkTransitions: true)
    }

    @Test(arguments: ScenarioTests.corpus)
    func everyScenarioAgreesWithTheKernel(_ path: String) throws {
        let scenario = try ScenarioParser.parse(text: try #require(readFile(path)), file: path)
        let kernel = try KernelBackend()
        let runner = DifferentialRunner(Self.matchingModel(kernel), kernel)
        var failures: [String] = []
        _ = runner.run(scenario) { r in
            if r.status == .failed { failures.append("step \(r.index) \(r.op): \(r.message ?? "")") }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }

    /// A rep movsb stopped by MMIO on its first byte must leave nothing pending: the
    /// next access on the vCPU starts afresh (it used to exit one byte on, or take a
    /// stale completed MMIO read without exiting).
    @Test(arguments: [false, true])
    func anAccessStoppedOnMMIOLeavesNothingPending(write: Bool) throws {
        let k = try KernelBackend()
        let vm = try k.createVM(type: 0)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        let gpa: UInt64 = 3 << 30
        for count in [62, 20, 1] {
            let kind: GuestAccess.Kind = write ? .write([UInt8](repeating: 5, count: count)) : .read(count: UInt64(count))
            #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: gpa, kind: kind)) == .exit(.mmio(gpa: gpa, length: 1, isWrite: write)))
        }
    }

    /// A VM whose fd is closed lives on through its vCPUs, harness and all: a vCPU
    /// that runs for the first time after the close uses the VM's harness.
    @Test func aClosedVMFdKeepsItsHarness() throws {
        let k = try KernelBackend()
        let vm = try k.createVM(type: 0)
        let first = try k.createVCPU(vm: vm, id: 0)
        let second = try k.createVCPU(vm: vm, id: 1)
        let gpa: UInt64 = 3 << 30
        #expect(try k.guestAccess(vcpu: first, GuestAccess(gpa: gpa, kind: .read(count: 4))) == .exit(.mmio(gpa: gpa, length: 1, isWrite: false)))
        try k.close(vm)
        #expect(try k.guestAccess(vcpu: second, GuestAccess(gpa: gpa, kind: .write([1]))) == .exit(.mmio(gpa: gpa, length: 1, isWrite: true)))
    }

    /// A backend unmaps what its run left mapped when it goes.
    @Test func mappingsGoWithTheBackend() throws {
        var address: UInt64 = 0
        do {
            let k = try KernelBackend()
            address = try k.mmap(fd: nil, offset: 0, length: 1 << 20, prot: [.read, .write], shared: false).address
            #expect(mapsLine(containing: address))
        }
        #expect(!mapsLine(containing: address))
    }

    /// Whether /proc/self/maps has a mapping that starts at `address`.
    func mapsLine(containing address: UInt64) -> Bool {
        let text = readFile("/proc/self/maps") ?? ""
        return text.split(separator: "\n").contains { $0.hasPrefix(String(address, radix: 16) + "-") }
    }

    @Test func aHostLoadOfPrivateMemoryIsSIGBUSAtThePageStart() throws {
        let k = try KernelBackend()
        let vm = try k.createVM(type: 0)
        let gmem = try k.createGuestMemfd(on: vm, size: 16384, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        let map = try k.mmap(fd: gmem, offset: 0, length: 16384, prot: [.read, .write], shared: true)
        #expect(try k.hostRead(address: map.address + 8192 + 100, count: 64) == .sigbus(address: map.address + 8192 + 100))
        let shared = try k.createGuestMemfd(on: vm, size: 8192, flags: 3)
        let smap = try k.mmap(fd: shared, offset: 0, length: 16384, prot: [.read, .write], shared: true)
        #expect(try k.hostWrite(address: smap.address + 4096, bytes: [UInt8](repeating: 7, count: 8192))
                == .sigbus(address: smap.address + 8192), "the store crossing EOF faults at EOF")
        #expect(try k.hostRead(address: smap.address + 8191, count: 1) == .completed([7]))
    }

    @Test(.timeLimit(.minutes(1)))
    func aGuestThatNeverExitsIsStopped() throws {
        let k = try KernelBackend()
        k.guestTimeoutMS = 200
        let vm = try k.createVM(type: 0)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        // codeBase + 4 is the harness's `jmp $`.
        let outcome = try k.runHarnessCode(vcpu: vcpu, rip: GuestHarness.codeBase + 4)
        #expect(outcome == .failed(.EINTR, nil))
        // The vCPU is usable afterwards.
        let gmem = try k.createGuestMemfd(on: vm, size: 1 << 21, flags: UAPI.GUEST_MEMFD_FLAG_MMAP)
        try k.setUserMemoryRegion2(vm: vm, UserMemoryRegion2(
            slot: 0, flags: UAPI.KVM_MEM_GUEST_MEMFD, guestPhysAddr: 1 << 30, memorySize: 1 << 21,
            userspaceAddr: 0, guestMemfd: UInt32(gmem.raw)))
        #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 1 << 30, kind: .write([1, 2]))) == .completed([]))
        #expect(try k.guestAccess(vcpu: vcpu, GuestAccess(gpa: 1 << 30, kind: .read(count: 2))) == .completed([1, 2]))
    }

    @Test func aGuestThatFaultsWithoutAHandlerShutsDown() throws {
        let k = try KernelBackend()
        let vm = try k.createVM(type: 0)
        let vcpu = try k.createVCPU(vm: vm, id: 0)
        // A non-canonical RIP: #GP with no IDT is a triple fault.
        let outcome = try k.runHarnessCode(vcpu: vcpu, rip: 0x8000_0000_0000_0000)
        #expect(outcome == .exit(.shutdown))
    }

    @Test func touchingPrivateGuestMemfdKillsTheProcessWithSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let kvm = ckvm_open_rdwr("/dev/kvm")
            let vm = Int32(ckvm_ioctl_val(kvm, CKVM_CREATE_VM, 0))
            var args = ckvm_create_guest_memfd()
            args.size = 4096
            args.flags = UAPI.GUEST_MEMFD_FLAG_MMAP
            let gmem = Int32(ckvm_ioctl_ptr(vm, CKVM_CREATE_GUEST_MEMFD, &args))
            let addr = ckvm_mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0)
            let p = UnsafeMutablePointer<UInt8>(bitPattern: addr)!
            p.pointee = 1  // private memory: SIGBUS
        }
    }
}
#endif
