/* CRC-32C: a portable slice-by-8 path and an SSE4.2 path with three interleaved streams.
 *
 * The SSE4.2 crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so
 * one dependent chain runs at a third of the possible speed. We therefore cut each block of
 * 3 * N bytes into three streams of N bytes, run three independent CRCs, and combine them:
 * with the raw (not inverted) register, CRC(A || B) = shift_N(CRC(A)) ^ CRC(B) where shift_N
 * feeds N zero bytes, a linear map applied with four table lookups (Mark Adler's method; the
 * constant tables come from tools/gen_crc32c_tables.py).
 */
#include "shmb/crc32c.h"

#include <string.h>

#include "shmb/crc32c_tables.h"

typedef uint32_t (*crc32c_fn)(uint32_t crc, const void *buf, size_t len);

/* The one piece of mutable global state of the C core: written once by shmb_crc32c_init(). */
static crc32c_fn crc32c_selected = shmb_crc32c_table;
static const char *crc32c_selected_name = "table";

/* ---- portable path -------------------------------------------------------------------- */

static inline uint64_t load_le64(const unsigned char *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 |
           (uint64_t)p[7] << 56;
}

uint32_t shmb_crc32c_table(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    const uint32_t (*t)[256] = shmb_crc32c_slice8;
    uint32_t c = ~crc;

    while (len && ((uintptr_t)p & 7u) != 0) {
        c = t[0][(c ^ *p++) & 0xffu] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w = load_le64(p) ^ c;
        c = t[7][w & 0xffu] ^ t[6][(w >> 8) & 0xffu] ^ t[5][(w >> 16) & 0xffu] ^
            t[4][(w >> 24) & 0xffu] ^ t[3][(w >> 32) & 0xffu] ^ t[2][(w >> 40) & 0xffu] ^
            t[1][(w >> 48) & 0xffu] ^ t[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = t[0][(c ^ *p++) & 0xffu] ^ (c >> 8);
    return ~c;
}

/* ---- SSE4.2 path ---------------------------------------------------------------------- */

#if defined(__x86_64__) || defined(__i386__)
#define SHMB_CRC32C_HAVE_SSE42 1
#include <nmmintrin.h>

#if defined(__x86_64__)
typedef uint64_t crc_word;
#define CRC_WORD(c, p) ((uint64_t)_mm_crc32_u64((c), load_word(p)))
#else
typedef uint32_t crc_word;
#define CRC_WORD(c, p) ((uint32_t)_mm_crc32_u32((uint32_t)(c), load_word(p)))
#endif

static inline crc_word load_word(const unsigned char *p)
{
    crc_word w;
    memcpy(&w, p, sizeof w); /* x86 is little-endian; one unaligned-safe load */
    return w;
}

static inline uint32_t crc32c_shift(const uint32_t zeros[4][256], uint32_t crc)
{
    return zeros[0][crc & 0xffu] ^ zeros[1][(crc >> 8) & 0xffu] ^ zeros[2][(crc >> 16) & 0xffu] ^
           zeros[3][crc >> 24];
}

/* Three streams of `block` bytes each, while at least 3 * block bytes remain. */
#define CRC32C_THREE_STREAMS(block, zeros)                                                      \
    while (len >= 3 * (block)) {                                                                \
        crc_word c1 = 0, c2 = 0;                                                                \
        const unsigned char *end = p + (block);                                                 \
        do {                                                                                    \
            c0 = CRC_WORD(c0, p);                                                               \
            c1 = CRC_WORD(c1, p + (block));                                                     \
            c2 = CRC_WORD(c2, p + 2 * (block));                                                 \
            p += sizeof(crc_word);                                                              \
        } while (p < end);                                                                      \
        c0 = crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c1;                                  \
        c0 = crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c2;                                  \
        p += 2 * (block);                                                                       \
        len -= 3 * (block);                                                                     \
    }

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *buf,
                                                                size_t len)
{
    const unsigned char *p = buf;
    crc_word c0 = ~crc;

    while (len && ((uintptr_t)p & (sizeof(crc_word) - 1)) != 0) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        len--;
    }
    CRC32C_THREE_STREAMS(SHMB_CRC32C_LONG_BYTES, shmb_crc32c_zeros_long)
    CRC32C_THREE_STREAMS(SHMB_CRC32C_SHORT_BYTES, shmb_crc32c_zeros_short)
    while (len >= sizeof(crc_word)) {
        c0 = CRC_WORD(c0, p);
        p += sizeof(crc_word);
        len -= sizeof(crc_word);
    }
    while (len--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return ~(uint32_t)c0;
}
#endif

/* ---- dispatch ------------------------------------------------------------------------- */

void shmb_crc32c_init(void)
{
#ifdef SHMB_CRC32C_HAVE_SSE42
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc32c_selected = crc32c_sse42;
        crc32c_selected_name = "sse4.2";
    }
#endif
}

const char *shmb_crc32c_impl(void) { return crc32c_selected_name; }

uint32_t shmb_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_selected(crc, buf, len);
}
