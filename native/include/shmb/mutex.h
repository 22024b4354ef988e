/* A process-private mutex on one 32-bit word: what Producer._lock is, so that the C send path
 * takes it with one compare-and-swap instead of a Python method call.
 *
 * Why not threading.Lock: Producer.send in C (_native.SendPath) took and released the
 * producer's lock through `lock.acquire()` / `lock.release()`, ~370 of ~2,900 instructions
 * per send, most of it `acquire` parsing an empty argument tuple. A word the C path can CAS
 * costs a few instructions; Python code uses the same object (_native.Mutex) as it used the
 * Lock, threading.Condition included.
 *
 * The word: 0 unlocked, 1 locked, 2 locked and someone may sleep on it (the three-state futex
 * mutex of Drepper's "Futexes Are Tricky"): an unlock that finds 1 makes no system call.
 * Not owned by a thread (as threading.Lock: any thread may release it). No global state.
 */
#ifndef SHMB_MUTEX_H
#define SHMB_MUTEX_H

#include <stdint.h>

#define SHMB_MUTEX_UNLOCKED 0u
#define SHMB_MUTEX_LOCKED 1u
#define SHMB_MUTEX_CONTENDED 2u

/* Takes the mutex if it is free: 1 taken, 0 not. Never blocks; safe with or without the GIL. */
static inline int shmb_mutex_trylock(uint32_t *word)
{
    uint32_t expected = SHMB_MUTEX_UNLOCKED;
    return __atomic_compare_exchange_n(word, &expected, SHMB_MUTEX_LOCKED, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

/* Results of shmb_mutex_lock. */
#define SHMB_MUTEX_TAKEN 0
#define SHMB_MUTEX_TIMEOUT 1
#define SHMB_MUTEX_INTERRUPTED 2 /* a signal arrived: the caller runs its handlers, then retries */

/* Takes the mutex, sleeping until deadline_ns (CLOCK_MONOTONIC; < 0: no deadline). Call it
 * without the GIL: the holder may need the GIL to get to its unlock. */
int shmb_mutex_lock(uint32_t *word, int64_t deadline_ns);

/* Releases the mutex; wakes one sleeper if any may sleep. The caller checked it was held. */
void shmb_mutex_unlock(uint32_t *word);

#endif
