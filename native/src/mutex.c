/* The producer's mutex. See shmb/mutex.h. */
#include "shmb/mutex.h"

#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shmb/futex.h"

int shmb_mutex_lock(uint32_t *word, int64_t deadline_ns)
{
    if (shmb_mutex_trylock(word))
        return SHMB_MUTEX_TAKEN;
    /* From here the word says CONTENDED whenever we may sleep, so the unlock wakes us. Taking
     * it by exchange leaves it CONTENDED even if nobody else sleeps: one spare wake-up at most. */
    for (;;) {
        if (__atomic_exchange_n(word, SHMB_MUTEX_CONTENDED, __ATOMIC_ACQUIRE) ==
            SHMB_MUTEX_UNLOCKED)
            return SHMB_MUTEX_TAKEN;
        struct timespec ts, *tsp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - shmb_monotonic_ns();
            if (left <= 0)
                return SHMB_MUTEX_TIMEOUT;
            ts.tv_sec = (time_t)(left / 1000000000);
            ts.tv_nsec = (long)(left % 1000000000);
            tsp = &ts;
        }
        if (syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, SHMB_MUTEX_CONTENDED, tsp, NULL, 0) != 0
            && errno == EINTR)
            return SHMB_MUTEX_INTERRUPTED;
        /* woken, EAGAIN (the word changed) or ETIMEDOUT (the deadline check above ends it) */
    }
}

void shmb_mutex_unlock(uint32_t *word)
{
    if (__atomic_exchange_n(word, SHMB_MUTEX_UNLOCKED, __ATOMIC_RELEASE) == SHMB_MUTEX_CONTENDED)
        syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
