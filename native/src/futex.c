/* Futex wait/wake for words in shared mappings. See shmb/futex.h. */
#include "shmb/futex.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
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

static int spin_until_changed(const uint32_t *word, uint32_t expected, int64_t spin_ns)
{
    int64_t deadline = shmb_monotonic_ns() + spin_ns;
    for (unsigned i = 1;; i++) {
        if (shmb_u32_load_acquire(word) != expected)
            return 1;
        shmb_cpu_relax();
        if (i % SPIN_CLOCK_EVERY == 0 && shmb_monotonic_ns() >= deadline)
            return 0;
    }
}

int shmb_futex_wait(const uint32_t *word, uint32_t expected, int64_t timeout_ms, int64_t spin_ns)
{
    int64_t start = shmb_monotonic_ns();
    if (spin_ns > 0 && spin_until_changed(word, expected, spin_ns))
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
