/* Atomic access to words of a shared mapping, with the memory ordering in the name (Aeron's
 * habit: a reader sees at a glance which loads synchronise with which stores).
 *
 * Every address passed here must be naturally aligned (the layouts in shm_layout.h are, and
 * module.c checks offsets coming from Python). These are C11-compatible GCC/Clang builtins; on
 * x86-64 an acquire load and a release store are plain moves, a seq_cst store is an xchg.
 */
#ifndef SHMB_SHM_ATOMIC_H
#define SHMB_SHM_ATOMIC_H

#include <stdint.h>

static inline uint32_t shmb_u32_load_acquire(const void *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}

static inline uint64_t shmb_u64_load_acquire(const void *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline uint32_t shmb_u32_load_relaxed(const void *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}

static inline uint64_t shmb_u64_load_relaxed(const void *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
}

static inline void shmb_u32_store_release(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

static inline void shmb_u64_store_release(void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

static inline void shmb_u32_store_relaxed(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

static inline void shmb_u64_store_relaxed(void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED);
}

/* Sequentially consistent: used for the "I may sleep" flags of the wake-up protocol, where a
 * store must not be reordered after a later load (docs/design/shm.md, "Wake-ups"). */
static inline void shmb_u32_store_seq_cst(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST);
}

static inline uint32_t shmb_u32_load_seq_cst(const void *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_SEQ_CST);
}

static inline uint64_t shmb_u64_load_seq_cst(const void *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_SEQ_CST);
}

static inline void shmb_u64_store_seq_cst(void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST);
}

static inline uint32_t shmb_u32_fetch_add(void *p, uint32_t delta)
{
    return __atomic_fetch_add((uint32_t *)p, delta, __ATOMIC_SEQ_CST);
}

static inline uint64_t shmb_u64_fetch_add(void *p, uint64_t delta)
{
    return __atomic_fetch_add((uint64_t *)p, delta, __ATOMIC_SEQ_CST);
}

/* Compare-and-swap; on failure *expected receives the value found. */
static inline int shmb_u32_cas(void *p, uint32_t *expected, uint32_t desired)
{
    return __atomic_compare_exchange_n((uint32_t *)p, expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline int shmb_u64_cas(void *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n((uint64_t *)p, expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline void shmb_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* Orders the plain loads before it (a copy out of a ring) before the loads after it (the
 * re-check that the ring's space was not handed back meanwhile): a seqlock reader's fence. */
static inline void shmb_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

static inline void shmb_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
