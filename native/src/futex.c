/* Futex wait/wake for words in shared mappings. See shmb/futex.h. */
#include "shmb/futex.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "shmb/shm_atomic.h"

/* Spin iterations between two clock reads while spinning. */
#define SPIN_CLOCK_EVERY 64

int64_t shmb_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int shmb_spin_until_changed(const uint32_t *word, uint32_t expected, int64_t spin_ns)
{
    if (spin_ns <= 0)
        return shmb_u32_load_acquire(word) != expected;
    int64_t deadline = shmb_monotonic_ns() + spin_ns;
    for (unsigned i = 1;; i++) {
        if (shmb_u32_load_acquire(word) != expected)
            return 1;
        shmb_cpu_relax();
        if (i % SPIN_CLOCK_EVERY == 0) {
            if (shmb_monotonic_ns() >= deadline)
                return 0;
            sched_yield();
        }
    }
}

int shmb_futex_wait(const uint32_t *word, uint32_t expected, int64_t timeout_ms, int64_t spin_ns)
{
    int64_t start = shmb_monotonic_ns();
    if (spin_ns > 0 && shmb_spin_until_changed(word, expected, spin_ns))
        return SHMB_WAIT_CHANGED;
    if (shmb_u32_load_acquire(word) != expected)
        return SHMB_WAIT_CHANGED;
    struct timespec ts, *tsp = NULL;
    if (timeout_ms >= 0) {
        int64_t left_ns = timeout_ms * 1000000 - (shmb_monotonic_ns() - start);
        if (left_ns <= 0)
            return SHMB_WAIT_TIMEOUT;
        ts.tv_sec = (time_t)(left_ns / 1000000000);
        ts.tv_nsec = (long)(left_ns % 1000000000);
        tsp = &ts;
    }
    long r = syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (r == 0)
        return SHMB_WAIT_WOKEN;
    switch (errno) {
    case EAGAIN:
        return SHMB_WAIT_CHANGED;
    case ETIMEDOUT:
        return SHMB_WAIT_TIMEOUT;
    case EINTR:
        return SHMB_WAIT_INTERRUPTED;
    default:
        /* EFAULT/EINVAL: the word is not mapped or misaligned, a programming error upstream;
         * report a wake-up so callers re-check instead of sleeping on garbage forever. */
        return SHMB_WAIT_WOKEN;
    }
}

int shmb_futex_wake(uint32_t *word, int count)
{
    return (int)syscall(SYS_futex, word, FUTEX_WAKE, count <= 0 ? INT_MAX : count, NULL, NULL, 0);
}

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449 /* the same number on every architecture (Linux 5.16+) */
#endif
#define SHMB_FUTEX_32 2     /* FUTEX2_SIZE_U32; no FUTEX_PRIVATE_FLAG: shared mappings */

struct shmb_futex_waitv {   /* the kernel's struct futex_waitv */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static int any_changed(const uint32_t *const *words, const uint32_t *expected, size_t n,
                       size_t *which)
{
    for (size_t i = 0; i < n; i++) {
        if (shmb_u32_load_acquire(words[i]) != expected[i]) {
            *which = i;
            return 1;
        }
    }
    return 0;
}

int shmb_futex_waitv(const uint32_t *const *words, const uint32_t *expected, size_t n,
                     int64_t timeout_ms, int64_t spin_ns, size_t *which)
{
    if (n == 0 || n > SHMB_FUTEX_WAITV_MAX)
        return SHMB_FUTEX_WAITV_UNSUPPORTED;
    int64_t start = shmb_monotonic_ns();
    *which = 0;
    for (unsigned i = 1; spin_ns > 0; i++) { /* bounded by spin_ns */
        if (any_changed(words, expected, n, which))
            return SHMB_WAIT_CHANGED;
        shmb_cpu_relax();
        if (i % SPIN_CLOCK_EVERY == 0) {
            if (shmb_monotonic_ns() - start >= spin_ns)
                break;
            sched_yield(); /* as shmb_spin_until_changed: the writer may need this CPU */
        }
    }
    if (any_changed(words, expected, n, which))
        return SHMB_WAIT_CHANGED;
    if (timeout_ms == 0)
        return SHMB_WAIT_TIMEOUT; /* a spin only: no syscall for a deadline already past */
    struct shmb_futex_waitv v[SHMB_FUTEX_WAITV_MAX];
    for (size_t i = 0; i < n; i++) {
        v[i].val = expected[i];
        v[i].uaddr = (uint64_t)(uintptr_t)words[i];
        v[i].flags = SHMB_FUTEX_32;
        v[i].reserved = 0;
    }
    struct timespec ts, *tsp = NULL;
    if (timeout_ms >= 0) { /* futex_waitv takes an absolute time on the given clock */
        int64_t deadline = start + timeout_ms * 1000000;
        ts.tv_sec = (time_t)(deadline / 1000000000);
        ts.tv_nsec = (long)(deadline % 1000000000);
        tsp = &ts;
    }
    long r = syscall(SYS_futex_waitv, v, (unsigned)n, 0, tsp, CLOCK_MONOTONIC);
    if (r >= 0) {
        *which = (size_t)r;
        return SHMB_WAIT_WOKEN;
    }
    switch (errno) {
    case EAGAIN:
        any_changed(words, expected, n, which);
        return SHMB_WAIT_CHANGED;
    case ETIMEDOUT:
        return SHMB_WAIT_TIMEOUT;
    case EINTR:
        return SHMB_WAIT_INTERRUPTED;
    case ENOSYS:
        return SHMB_FUTEX_WAITV_UNSUPPORTED;
    default:
        return SHMB_WAIT_WOKEN; /* as in shmb_futex_wait: let the caller re-check */
    }
}
