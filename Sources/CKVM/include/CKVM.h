// CKVM: the Linux-specific C the kernel backend needs: uapi structs the host's
// headers predate (guest_memfd arrived in 6.8/6.18, the headers here are 6.1),
// ioctl numbers (function-like _IOWR macros do not import into Swift), variadic
// calls wrapped in fixed-arity functions, and signal-safe memory probes.
//
// Every function returns 0 (or a non-negative result) on success and -errno on
// failure, so the Swift layer never reads a global errno.
#ifndef CKVM_H
#define CKVM_H
#ifdef __linux__

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

// struct kvm_userspace_memory_region2 (uapi/linux/kvm.h, 6.8+): 160 bytes.
struct ckvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

// struct kvm_create_guest_memfd: 64 bytes.
struct ckvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

// struct kvm_memory_attributes: 32 bytes.
struct ckvm_memory_attributes {
    uint64_t address;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
};

// struct kvm_pre_fault_memory: 64 bytes.
struct ckvm_pre_fault_memory {
    uint64_t gpa;
    uint64_t size;
    uint64_t flags;
    uint64_t padding[5];
};

// struct kvm_memory_attributes2 (the in-place series): 128 bytes, on a guest_memfd.
struct ckvm_memory_attributes2 {
    uint64_t offset;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
    uint64_t error_offset;
    uint64_t reserved[11];
};

// kvm_run.memory_fault (KVM_EXIT_MEMORY_FAULT = 39): in the exit union.
struct ckvm_memory_fault {
    uint64_t flags;
    uint64_t gpa;
    uint64_t size;
};

// ioctl numbers.
extern const unsigned long CKVM_GET_API_VERSION;
extern const unsigned long CKVM_CREATE_VM;
extern const unsigned long CKVM_CHECK_EXTENSION;
extern const unsigned long CKVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long CKVM_GET_SUPPORTED_CPUID;
extern const unsigned long CKVM_CREATE_VCPU;
extern const unsigned long CKVM_SET_USER_MEMORY_REGION;
extern const unsigned long CKVM_SET_USER_MEMORY_REGION2;
extern const unsigned long CKVM_SET_MEMORY_ATTRIBUTES;
extern const unsigned long CKVM_SET_MEMORY_ATTRIBUTES2;
extern const unsigned long CKVM_CREATE_GUEST_MEMFD;
extern const unsigned long CKVM_PRE_FAULT_MEMORY;
extern const unsigned long CKVM_ENABLE_CAP;
extern const unsigned long CKVM_RUN;
extern const unsigned long CKVM_GET_REGS;
extern const unsigned long CKVM_SET_REGS;
extern const unsigned long CKVM_GET_SREGS;
extern const unsigned long CKVM_SET_SREGS;
extern const unsigned long CKVM_SET_CPUID2;

/// ioctl(fd, request, arg) with a pointer argument; the result, or -errno.
long ckvm_ioctl_ptr(int fd, unsigned long request, void *arg);
/// ioctl(fd, request, arg) with an integer argument; the result, or -errno.
long ckvm_ioctl_val(int fd, unsigned long request, unsigned long arg);

/// open(path, O_RDWR | O_CLOEXEC); the fd, or -errno.
int ckvm_open_rdwr(const char *path);
/// close(2); 0 or -errno.
int ckvm_close(int fd);
/// memfd_create(name, MFD_CLOEXEC) then ftruncate(size); the fd, or -errno.
int ckvm_memfd_create(const char *name, uint64_t size);
/// memfd_secret(2) (raw syscall: glibc has no wrapper) then ftruncate(size); the fd,
/// or -errno (ENOSYS where secretmem is off).
int ckvm_memfd_secret(uint64_t size);
/// fallocate(2) with 64-bit offset and length passed unchanged; 0 or -errno.
int ckvm_fallocate(int fd, int mode, uint64_t offset, uint64_t length);
/// ftruncate(2); 0 or -errno.
int ckvm_ftruncate(int fd, uint64_t size);
/// lseek(2); the new offset, or -errno.
int64_t ckvm_lseek(int fd, int64_t offset, int whence);
/// read(2) / write(2) / pread(2) / pwrite(2); the byte count, or -errno.
int64_t ckvm_read(int fd, void *buf, uint64_t count);
int64_t ckvm_write(int fd, const void *buf, uint64_t count);
int64_t ckvm_pread(int fd, void *buf, uint64_t count, uint64_t offset);
int64_t ckvm_pwrite(int fd, const void *buf, uint64_t count, uint64_t offset);

struct ckvm_stat {
    uint64_t size;
    uint64_t blksize;
    uint64_t blocks;
    uint64_t ino;
};
/// fstat(2); 0 or -errno.
int ckvm_fstat(int fd, struct ckvm_stat *out);

/// mmap(2); the address, or (void *)-errno cast through intptr_t.
intptr_t ckvm_mmap(void *addr, uint64_t length, int prot, int flags, int fd, uint64_t offset);
/// mprotect(2); 0 or -errno.
int ckvm_mprotect(uint64_t addr, uint64_t length, int prot);
/// munmap(2); 0 or -errno.
int ckvm_munmap(uint64_t addr, uint64_t length);

/// Copies `count` bytes page by page from `src` to `dst` (one of which is a
/// mapping that may fault), catching SIGBUS and SIGSEGV. Returns 0, or the signal
/// number with the faulting address in *fault_addr; pages before the faulting one
/// have been copied, as with memcpy through the mapping.
int ckvm_probe_copy(void *dst, const void *src, uint64_t count, uint64_t *fault_addr);

/// KVM_RUN on `vcpu_fd`, interrupted after `timeout_ms` (a timer signal makes the
/// ioctl return EINTR). Returns 0 or -errno.
int ckvm_run(int vcpu_fd, unsigned timeout_ms);

/// Offset of the exit union in struct kvm_run (kvm_run.mmio, .io, .memory_fault).
size_t ckvm_run_exit_union_offset(void);

#endif  // __linux__
#endif  // CKVM_H
