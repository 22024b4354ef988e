/* Futex wait and wake on a 32-bit word of a shared mapping (Linux).
 *
 * The operations are the shared (not FUTEX_PRIVATE) ones: the waiter and the waker are
 * different processes, each with its own mapping of the same shared-memory object, and the
 * kernel keys the futex by the underlying page, not by the virtual address.
 *
 * No global state; safe without the GIL.
 */
#ifndef SHMB_FUTEX_H
#define SHMB_FUTEX_H

#include <stddef.h>
#include <stdint.h>

#include "shmb/shm_layout.h"

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t shmb_monotonic_ns(void);

/* Waits while *word == expected: first spins up to spin_ns (0 = no spin) re-reading the word,
 * then sleeps in FUTEX_WAIT up to timeout_ms in total (< 0 = no timeout). Returns
 * SHMB_WAIT_CHANGED (the word differed, no sleep), SHMB_WAIT_WOKEN (woken, maybe spuriously:
 * the caller re-checks its condition), SHMB_WAIT_TIMEOUT or SHMB_WAIT_INTERRUPTED (EINTR). */
int shmb_futex_wait(const uint32_t *word, uint32_t expected, int64_t timeout_ms, int64_t spin_ns);
/* The spin of shmb_futex_wait alone: re-reads the word (yielding the CPU now and then) up to
 * spin_ns; 1 when it differed from expected, 0 when the spin ran out. A waiter that counts
 * itself for its waker (a waiters word) spins with this first and counts itself only before
 * the sleep: a waker then skips FUTEX_WAKE while the waiter still spins, and the futex's own
 * compare keeps the protocol race-free (docs/design/shm.md). */
int shmb_spin_until_changed(const uint32_t *word, uint32_t expected, int64_t spin_ns);

/* Most words one shmb_futex_waitv waits on (the kernel's limit is 128). */
#define SHMB_FUTEX_WAITV_MAX 128
/* shmb_futex_waitv on a kernel without futex_waitv (before Linux 5.16), or n out of range. */
#define SHMB_FUTEX_WAITV_UNSUPPORTED (-1)

/* Waits until any words[i] != expected[i] (Linux 5.16 futex_waitv: one sleep on many words,
 * e.g. a consumer on several partitions), spinning up to spin_ns first. *which = the word
 * that woke or changed (best effort). Returns SHMB_WAIT_CHANGED, SHMB_WAIT_WOKEN,
 * SHMB_WAIT_TIMEOUT, SHMB_WAIT_INTERRUPTED or SHMB_FUTEX_WAITV_UNSUPPORTED. */
int shmb_futex_waitv(const uint32_t *const *words, const uint32_t *expected, size_t n,
                     int64_t timeout_ms, int64_t spin_ns, size_t *which);

/* Wakes up to count waiters on word; returns how many were woken (or -1, errno set). */
int shmb_futex_wake(uint32_t *word, int count);

#endif
