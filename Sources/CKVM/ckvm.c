#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifdef __linux__
#include "CKVM.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

// The guest_memfd ioctls, with this file's struct copies.
#define CKVM_IOC_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct ckvm_userspace_memory_region2)
#define CKVM_IOC_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct ckvm_memory_attributes)
#define CKVM_IOC_SET_MEMORY_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct ckvm_memory_attributes2)
#define CKVM_IOC_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct ckvm_create_guest_memfd)
#define CKVM_IOC_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct ckvm_pre_fault_memory)

_Static_assert(sizeof(struct ckvm_userspace_memory_region2) == 160, "uapi size");
_Static_assert(sizeof(struct ckvm_create_guest_memfd) == 64, "uapi size");
_Static_assert(sizeof(struct ckvm_memory_attributes) == 32, "uapi size");
_Static_assert(sizeof(struct ckvm_pre_fault_memory) == 64, "uapi size");
_Static_assert(sizeof(struct ckvm_memory_attributes2) == 128, "uapi size");

const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long CKVM_SET_USER_MEMORY_REGION2 = CKVM_IOC_SET_USER_MEMORY_REGION2;
const unsigned long CKVM_SET_MEMORY_ATTRIBUTES = CKVM_IOC_SET_MEMORY_ATTRIBUTES;
const unsigned long CKVM_SET_MEMORY_ATTRIBUTES2 = CKVM_IOC_SET_MEMORY_ATTRIBUTES2;
const unsigned long CKVM_CREATE_GUEST_MEMFD = CKVM_IOC_CREATE_GUEST_MEMFD;
const unsigned long CKVM_PRE_FAULT_MEMORY = CKVM_IOC_PRE_FAULT_MEMORY;
const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
const unsigned long CKVM_RUN = KVM_RUN;
const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;

static long result_or_errno(long r) { return r < 0 ? -errno : r; }

long ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return result_or_errno(ioctl(fd, request, arg));
}

long ckvm_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    return result_or_errno(ioctl(fd, request, arg));
}

int ckvm_open_rdwr(const char *path) { return (int)result_or_errno(open(path, O_RDWR | O_CLOEXEC)); }

int ckvm_close(int fd) { return (int)result_or_errno(close(fd)); }

/// Gives a new file descriptor its size, or closes it: the fd, or -errno.
static int sized_or_closed(int fd, uint64_t size) {
    if (fd < 0) return -errno;
    if (ftruncate(fd, (off_t)size) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int ckvm_memfd_create(const char *name, uint64_t size) {
    return sized_or_closed(memfd_create(name, MFD_CLOEXEC), size);
}

int ckvm_memfd_secret(uint64_t size) {
#ifdef SYS_memfd_secret
    return sized_or_closed((int)syscall(SYS_memfd_secret, O_CLOEXEC), size);
#else
    return sized_or_closed((int)syscall(447, O_CLOEXEC), size);
#endif
}

int ckvm_fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
    return (int)result_or_errno(fallocate(fd, mode, (off_t)offset, (off_t)length));
}

int ckvm_ftruncate(int fd, uint64_t size) { return (int)result_or_errno(ftruncate(fd, (off_t)size)); }

int64_t ckvm_lseek(int fd, int64_t offset, int whence) { return result_or_errno(lseek(fd, offset, whence)); }

int64_t ckvm_read(int fd, void *buf, uint64_t count) { return result_or_errno(read(fd, buf, count)); }

int64_t ckvm_write(int fd, const void *buf, uint64_t count) { return result_or_errno(write(fd, buf, count)); }

int64_t ckvm_pread(int fd, void *buf, uint64_t count, uint64_t offset) {
    return result_or_errno(pread(fd, buf, count, (off_t)offset));
}

int64_t ckvm_pwrite(int fd, const void *buf, uint64_t count, uint64_t offset) {
    return result_or_errno(pwrite(fd, buf, count, (off_t)offset));
}

int ckvm_fstat(int fd, struct ckvm_stat *out) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    out->size = (uint64_t)st.st_size;
    out->blksize = (uint64_t)st.st_blksize;
    out->blocks = (uint64_t)st.st_blocks;
    out->ino = (uint64_t)st.st_ino;
    return 0;
}

intptr_t ckvm_mmap(void *addr, uint64_t length, int prot, int flags, int fd, uint64_t offset) {
    void *p = mmap(addr, length, prot, flags, fd, (off_t)offset);
    if (p == MAP_FAILED) return -errno;
    return (intptr_t)p;
}

int ckvm_mprotect(uint64_t addr, uint64_t length, int prot) {
    return (int)result_or_errno(mprotect((void *)(uintptr_t)addr, length, prot));
}

int ckvm_munmap(uint64_t addr, uint64_t length) {
    return (int)result_or_errno(munmap((void *)(uintptr_t)addr, length));
}

// ---- Memory probes: SIGBUS/SIGSEGV become results, never crashes. ----

static __thread sigjmp_buf probe_jump;
static __thread volatile sig_atomic_t probe_active;
static __thread volatile uint64_t probe_fault_addr;
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;

static void probe_handler(int signo, siginfo_t *info, void *context) {
    (void)context;
    if (probe_active) {
        probe_active = 0;
        probe_fault_addr = (uint64_t)(uintptr_t)info->si_addr;
        siglongjmp(probe_jump, signo);
    }
    // A fault outside a probe is a real crash: restore the default and let the
    // faulting instruction run again.
    signal(signo, SIG_DFL);
}

static void probe_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = probe_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGSEGV, &sa, NULL);
}

int ckvm_probe_copy(void *dst, const void *src, uint64_t count, uint64_t *fault_addr) {
    pthread_once(&probe_once, probe_install);
    volatile uint64_t done = 0;
    int signo = sigsetjmp(probe_jump, 1);
    if (signo != 0) {
        *fault_addr = probe_fault_addr;
        return signo;
    }
    probe_active = 1;
    const uint64_t page = 4096;
    while (done < count) {
        // Cut at the page boundary of whichever side is the mapping: both, to be safe.
        uint64_t d = (uint64_t)(uintptr_t)dst + done;
        uint64_t s = (uint64_t)(uintptr_t)src + done;
        uint64_t room_d = page - (d & (page - 1));
        uint64_t room_s = page - (s & (page - 1));
        uint64_t n = count - done;
        if (n > room_d) n = room_d;
        if (n > room_s) n = room_s;
        // Touch the chunk's first byte on its own, so a fault is reported at the
        // first byte of the page that faults whatever order memcpy copies in.
        ((volatile char *)dst)[done] = ((const volatile char *)src)[done];
        memcpy((char *)dst + done + 1, (const char *)src + done + 1, n - 1);
        done += n;
    }
    probe_active = 0;
    return 0;
}

// ---- KVM_RUN with a time limit. ----

static void timer_handler(int signo) { (void)signo; }
static pthread_once_t timer_once = PTHREAD_ONCE_INIT;

static void timer_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = timer_handler;  // no SA_RESTART: KVM_RUN returns EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN + 1, &sa, NULL);
}

int ckvm_run(int vcpu_fd, unsigned timeout_ms) {
    pthread_once(&timer_once, timer_install);
    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGRTMIN + 1;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) < 0) return -errno;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = timeout_ms / 1000;
    its.it_value.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
    // Repeat, so a signal that lands just before the ioctl is not the only one.
    its.it_interval.tv_nsec = 50 * 1000000L;
    // Threads from a pool (dispatch, the test runner) block most signals; a blocked
    // timer signal would never interrupt KVM_RUN. Unblock it for the call.
    sigset_t timer_only, saved;
    sigemptyset(&timer_only);
    sigaddset(&timer_only, SIGRTMIN + 1);
    pthread_sigmask(SIG_UNBLOCK, &timer_only, &saved);
    timer_settime(timer, 0, &its, NULL);
    int r = ioctl(vcpu_fd, KVM_RUN, 0);
    int e = errno;
    timer_delete(timer);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return r < 0 ? -e : r;
}

size_t ckvm_run_exit_union_offset(void) { return offsetof(struct kvm_run, mmio); }

#endif  // __linux__
