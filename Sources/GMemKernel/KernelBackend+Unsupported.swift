#if os(Linux)
import GMemBackend

/// What this host's kernel backend cannot do (no pins from a scenario, one process, no
/// IOMMU, no pKVM, no view of the kernel's state): each says why, and runs on the model.
extension KernelBackend {
    public func pin(address: UInt64, length: UInt64, longterm: Bool, write: Bool) throws(BackendError) -> ObjectHandle {
        throw .unsupported(missing(.pins)!)
    }

    public func unpin(_ pin: ObjectHandle) throws(BackendError) {
        throw .unsupported(missing(.pins)!)
    }

    public func gupFastReference(address: UInt64, length: UInt64) throws(BackendError) -> ObjectHandle {
        throw .unsupported(missing(.pins)!)
    }

    public func dropSpeculativeReferences(_ handle: ObjectHandle) throws(BackendError) {
        throw .unsupported(missing(.pins)!)
    }

    public func fork() throws(BackendError) -> ProcessHandle {
        throw .unsupported(missing(.processes)!)
    }

    public func switchProcess(_ process: ProcessHandle) throws(BackendError) {
        if process != .vmm { throw .unsupported(missing(.processes)!) }
    }

    public func exitProcess(_ process: ProcessHandle) throws(BackendError) {
        throw .unsupported(missing(.processes)!)
    }

    public func createIOMMUDomain(_ model: IOMMUModel, vm: FD?) throws(BackendError) -> ObjectHandle {
        throw .unsupported(missing(.iommu)!)
    }

    public func iommuMap(domain: ObjectHandle, iova: UInt64, address: UInt64?, fd: FD?, offset: UInt64, length: UInt64)
        throws(BackendError)
    {
        throw .unsupported(missing(.iommu)!)
    }

    public func iommuUnmap(domain: ObjectHandle, iova: UInt64, length: UInt64) throws(BackendError) {
        throw .unsupported(missing(.iommu)!)
    }

    public func dma(domain: ObjectHandle, iova: UInt64, write: [UInt8]?, count: UInt64) throws(BackendError) -> [UInt8] {
        throw .unsupported(missing(.iommu)!)
    }

    public func pkvmCreateGuest(protected: Bool) throws(BackendError) -> ObjectHandle { throw .unsupported(missing(.pkvm)!) }
    public func pkvmCall(_ call: PKVMCall, _ args: PKVMArgs) throws(BackendError) { throw .unsupported(missing(.pkvm)!) }
    public func pkvmAccess(page: UInt64, guest: ObjectHandle?, gfn: UInt64, write: UInt8?) throws(BackendError) -> UInt8 {
        throw .unsupported(missing(.pkvm)!)
    }
    public func pkvmState(page: UInt64, guest: ObjectHandle?, gfn: UInt64) throws(BackendError) -> [String: PageState] {
        throw .unsupported(missing(.pkvm)!)
    }

    public func checkInvariants() throws(BackendError) -> [Violation] {
        throw .unsupported("the kernel's page tables and refcounts cannot be inspected from user space; invariants are checked on the model")
    }

    public func memoryFailure(fd: FD, offset: UInt64) throws(BackendError) {
        throw .unsupported(missing(.memoryFailure)!)
    }
}
#endif
