/* CRC-32C: a portable slice-by-8 path, an SSE4.2 path with three interleaved streams, and two
 * carry-less-multiply folding paths (PCLMULQDQ on 128-bit lanes, VPCLMULQDQ on 512-bit ones).
 *
 * The SSE4.2 crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so
 * one dependent chain runs at a third of the possible speed. We therefore cut each block of
 * 3 * N bytes into three streams of N bytes, run three independent CRCs, and combine them:
 * with the raw (not inverted) register, CRC(A || B) = shift_N(CRC(A)) ^ CRC(B) where shift_N
 * feeds N zero bytes, a linear map applied with four table lookups (Mark Adler's method; the
 * constant tables come from tools/gen_crc32c_tables.py).
 *
 * The folding paths go further: the raw CRC of a message M is M(x) * x^32 mod P, and M may be
 * replaced by anything congruent to it mod P. Four 128-bit accumulators (or four 512-bit ones,
 * each four 128-bit lanes) hold the message read so far; each step multiplies an accumulator
 * by x^D mod P (D = the bits between it and the next block it absorbs, two carry-less
 * multiplies by 32-bit constants) and XORs that block in. At the end the lanes are folded into
 * one 128-bit value, the crc32 instruction reduces it to the 32-bit register, and the SSE4.2
 * path finishes the last < 16 bytes. The constants and their derivation are in
 * tools/gen_crc32c_tables.py (fold_constants), which also checks them on a message.
 */
#include "shmb/crc32c.h"

#include <string.h>

#include "shmb/crc32c_tables.h"

typedef shmb_crc32c_fn crc32c_fn;

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

/* ---- PCLMULQDQ path: four 128-bit accumulators, 64 bytes a step ------------------------ */

/* On Zen 5 this path is throughput-bound on PCLMULQDQ (about one every two cycles whatever the
 * width; eight accumulators instead of four change nothing) and runs at half the speed of the
 * three crc32 streams when the data is in cache (17 vs 33 GB/s on 1 MiB; both ~16.5 GB/s on
 * 64 MiB). It therefore ranks below SSE4.2 in the dispatch; its pieces serve the 512-bit path,
 * and tests and benchmarks reach it by name. */

#if defined(__x86_64__)
#define SHMB_CRC32C_HAVE_CLMUL 1
#include <immintrin.h>

/* Below these many bytes the alignment head, set-up and final reduction cost more than they
 * save; both go to the SSE4.2 path. Measured on a Zen 5 EPYC VM (ns per call, SSE4.2 vs
 * 512-bit): 160 B 10.3 vs 10.8, 192 B 12.0 vs 11.8, 256 B 15.2 vs 12.1, 512 B 32.8 vs 16.3.
 * The 512-bit path needs >= 63 + 64 bytes (alignment head, one block). */
#define CRC32C_PCLMUL_BYTES_MIN 256
#define CRC32C_VPCLMUL_BYTES_MIN 256

#define CLMUL_TARGET __attribute__((target("pclmul,sse4.2")))

/* {low, high} lane constants from the generated header, for _mm_clmulepi64_si128. */
CLMUL_TARGET static inline __m128i fold_constant(const uint64_t k[2])
{
    return _mm_loadu_si128((const __m128i *)(const void *)k);
}

/* x moved on by the distance k was made for: low qword times k[0], high qword times k[1]. */
CLMUL_TARGET static inline __m128i fold128(__m128i x, __m128i k)
{
    return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

/* The raw register of a 128-bit remainder: crc32 on a qword q turns register r into
 * (r * x^64 + q * x^32) mod P, so two of them from r = 0 give (remainder * x^32) mod P. */
CLMUL_TARGET static inline uint32_t reduce128(__m128i x)
{
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    return (uint32_t)_mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(x, 1));
}

/* Merges four consecutive 128-bit lanes (x0 first) that end where p starts, folds the whole
 * 16-byte blocks of p, and lets the SSE4.2 path do the last < 16 bytes. Returns the CRC. */
CLMUL_TARGET static inline uint32_t clmul_finish(__m128i x0, __m128i x1, __m128i x2, __m128i x3,
                                                 const unsigned char *p, size_t len)
{
    const __m128i k128 = fold_constant(shmb_crc32c_fold_128);
    __m128i x = _mm_xor_si128(_mm_xor_si128(fold128(x0, fold_constant(shmb_crc32c_fold_384)),
                                            fold128(x1, fold_constant(shmb_crc32c_fold_256))),
                              _mm_xor_si128(fold128(x2, k128), x3));
    while (len >= 16) {
        x = _mm_xor_si128(fold128(x, k128), _mm_loadu_si128((const __m128i *)(const void *)p));
        p += 16;
        len -= 16;
    }
    return crc32c_sse42(~reduce128(x), p, len);
}

CLMUL_TARGET static uint32_t crc32c_pclmul(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    if (len < CRC32C_PCLMUL_BYTES_MIN)
        return crc32c_sse42(crc, p, len);

    size_t head = (size_t)(-(uintptr_t)p & 15u); /* aligned loads from here on */
    crc = crc32c_sse42(crc, p, head);
    p += head;
    len -= head;

    /* The initial register is XORed into the first four bytes of the message. */
    const __m128i *v = (const __m128i *)(const void *)p;
    __m128i x0 = _mm_xor_si128(_mm_load_si128(v), _mm_cvtsi32_si128((int)~crc));
    __m128i x1 = _mm_load_si128(v + 1), x2 = _mm_load_si128(v + 2), x3 = _mm_load_si128(v + 3);
    const __m128i k512 = fold_constant(shmb_crc32c_fold_512);
    for (p += 64, len -= 64; len >= 64; p += 64, len -= 64) {
        v = (const __m128i *)(const void *)p;
        x0 = _mm_xor_si128(fold128(x0, k512), _mm_load_si128(v));
        x1 = _mm_xor_si128(fold128(x1, k512), _mm_load_si128(v + 1));
        x2 = _mm_xor_si128(fold128(x2, k512), _mm_load_si128(v + 2));
        x3 = _mm_xor_si128(fold128(x3, k512), _mm_load_si128(v + 3));
    }
    return clmul_finish(x0, x1, x2, x3, p, len);
}

/* ---- VPCLMULQDQ + AVX-512 path: four 512-bit accumulators, 256 bytes a step ------------ */

#define VPCLMUL_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2")))

/* fold128 on each of the four 128-bit lanes, with `data` XORed in (one three-way XOR). */
VPCLMUL_TARGET static inline __m512i fold512_xor(__m512i x, __m512i k, __m512i data)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                     _mm512_clmulepi64_epi128(x, k, 0x11), data, 0x96);
}

VPCLMUL_TARGET static uint32_t crc32c_vpclmul(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    if (len < CRC32C_VPCLMUL_BYTES_MIN)
        return crc32c_sse42(crc, p, len);

    size_t head = (size_t)(-(uintptr_t)p & 63u); /* one cache line per load from here on */
    crc = crc32c_sse42(crc, p, head);
    p += head;
    len -= head;

    /* The initial register is XORed into the first four bytes of the message. */
    const __m512i first = _mm512_inserti32x4(_mm512_setzero_si512(),
                                             _mm_cvtsi32_si128((int)~crc), 0);
    const __m512i k512 = _mm512_broadcast_i32x4(fold_constant(shmb_crc32c_fold_512));
    const __m512i *v = (const __m512i *)(const void *)p;
    __m512i x;
    if (len >= 256) {
        __m512i x0 = _mm512_xor_si512(_mm512_load_si512(v), first);
        __m512i x1 = _mm512_load_si512(v + 1), x2 = _mm512_load_si512(v + 2);
        __m512i x3 = _mm512_load_si512(v + 3);
        const __m512i k2048 = _mm512_broadcast_i32x4(fold_constant(shmb_crc32c_fold_2048));
        for (p += 256, len -= 256; len >= 256; p += 256, len -= 256) {
            v = (const __m512i *)(const void *)p;
            x0 = fold512_xor(x0, k2048, _mm512_load_si512(v));
            x1 = fold512_xor(x1, k2048, _mm512_load_si512(v + 1));
            x2 = fold512_xor(x2, k2048, _mm512_load_si512(v + 2));
            x3 = fold512_xor(x3, k2048, _mm512_load_si512(v + 3));
        }
        /* Each accumulator ends 512 bits before the next one starts: fold them into one. */
        x = fold512_xor(fold512_xor(fold512_xor(x0, k512, x1), k512, x2), k512, x3);
    } else {
        x = _mm512_xor_si512(_mm512_load_si512(v), first);
        p += 64;
        len -= 64;
    }
    for (; len >= 64; p += 64, len -= 64)
        x = fold512_xor(x, k512, _mm512_load_si512((const void *)p));
    return clmul_finish(_mm512_castsi512_si128(x), _mm512_extracti32x4_epi32(x, 1),
                        _mm512_extracti32x4_epi32(x, 2), _mm512_extracti32x4_epi32(x, 3), p, len);
}
#endif

/* ---- dispatch ------------------------------------------------------------------------- */

/* Every implementation, fastest first as measured (see the PCLMULQDQ path for why it comes
 * after SSE4.2); `runnable` asks CPUID and, for AVX-512, whether the OS saves the opmask and
 * ZMM state (__builtin_cpu_supports("avx512f") checks XCR0 through XGETBV for that). */
struct crc32c_impl {
    const char *name;
    crc32c_fn fn;
    int (*runnable)(void);
};

static int runnable_always(void) { return 1; }

#ifdef SHMB_CRC32C_HAVE_SSE42
static int runnable_sse42(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#endif

#ifdef SHMB_CRC32C_HAVE_CLMUL
static int runnable_pclmul(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul");
}

static int runnable_vpclmul(void)
{
    __builtin_cpu_init();
    return runnable_pclmul() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq");
}
#endif

static const struct crc32c_impl crc32c_impls[] = {
#ifdef SHMB_CRC32C_HAVE_CLMUL
    {"vpclmulqdq-avx512", crc32c_vpclmul, runnable_vpclmul},
#endif
#ifdef SHMB_CRC32C_HAVE_SSE42
    {"sse4.2", crc32c_sse42, runnable_sse42},
#endif
#ifdef SHMB_CRC32C_HAVE_CLMUL
    {"pclmul", crc32c_pclmul, runnable_pclmul},
#endif
    {"table", shmb_crc32c_table, runnable_always},
};

#define CRC32C_IMPLS_COUNT (sizeof crc32c_impls / sizeof crc32c_impls[0])

void shmb_crc32c_init(void)
{
    for (size_t i = 0; i < CRC32C_IMPLS_COUNT; i++) {
        if (crc32c_impls[i].runnable()) {
            crc32c_selected = crc32c_impls[i].fn;
            crc32c_selected_name = crc32c_impls[i].name;
            return;
        }
    }
}

const char *shmb_crc32c_impl(void) { return crc32c_selected_name; }

const char *shmb_crc32c_impl_name(size_t i)
{
    for (size_t j = 0; j < CRC32C_IMPLS_COUNT; j++) {
        if (crc32c_impls[j].runnable() && i-- == 0)
            return crc32c_impls[j].name;
    }
    return NULL;
}

shmb_crc32c_fn shmb_crc32c_impl_fn(const char *name)
{
    for (size_t j = 0; j < CRC32C_IMPLS_COUNT; j++) {
        if (strcmp(crc32c_impls[j].name, name) == 0)
            return crc32c_impls[j].runnable() ? crc32c_impls[j].fn : NULL;
    }
    return NULL;
}

uint32_t shmb_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_selected(crc, buf, len);
}
