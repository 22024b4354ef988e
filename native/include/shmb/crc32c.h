/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by Kafka's RecordBatch v2.
 *
 * Chaining works like zlib's crc32: crc is the result of the previous call (0 to start), so
 * shmb_crc32c(shmb_crc32c(0, a, na), b, nb) == CRC of a followed by b.
 *
 * Plain C, no Python. Thread-safe once shmb_crc32c_init() has run (it picks the fastest
 * implementation for this CPU; before it runs, shmb_crc32c uses the portable table path).
 */
#ifndef SHMB_CRC32C_H
#define SHMB_CRC32C_H

#include <stddef.h>
#include <stdint.h>

typedef uint32_t (*shmb_crc32c_fn)(uint32_t crc, const void *buf, size_t len);

/* Picks the implementation from CPUID. Call once, before any other thread uses shmb_crc32c. */
void shmb_crc32c_init(void);

/* The implementation chosen by shmb_crc32c_init(), the fastest this CPU runs, in this order:
 * "vpclmulqdq-avx512", "sse4.2", "pclmul" (slower than "sse4.2" where measured, so only
 * reachable through shmb_crc32c_impl_fn) or "table". */
const char *shmb_crc32c_impl(void);

/* The name of the i-th implementation this CPU can run, fastest first (0 is the one
 * shmb_crc32c_init() picks); NULL when i is past the last. For tests and benchmarks. */
const char *shmb_crc32c_impl_name(size_t i);

/* The implementation called name (a name from shmb_crc32c_impl_name), or NULL if there is
 * none by that name or this CPU cannot run it. For tests and benchmarks. */
shmb_crc32c_fn shmb_crc32c_impl_fn(const char *name);

/* CRC-32C of len bytes at buf, continuing from crc (0 to start). */
uint32_t shmb_crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable slice-by-8 path, always available (tests compare it with the fast path). */
uint32_t shmb_crc32c_table(uint32_t crc, const void *buf, size_t len);

#endif
