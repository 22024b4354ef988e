/* Zigzag varints of Kafka's records (protobuf's encoding): int32 values take at most 5 bytes,
 * int64 values at most 10. Header-only; every reader is bounded by an end pointer.
 *
 * Worked example: -1 zigzags to 1 and is written as the single byte 0x01; 300 zigzags to 600
 * and is written as 0xd8 0x04 (low 7 bits first, high bit = "more bytes follow").
 */
#ifndef SHMB_VARINT_H
#define SHMB_VARINT_H

#include <stddef.h>
#include <stdint.h>

#define SHMB_VARINT32_BYTES_MAX 5
#define SHMB_VARINT64_BYTES_MAX 10

/* Results of the readers. */
#define SHMB_VARINT_OK 0
#define SHMB_VARINT_TRUNCATED (-1) /* the end pointer came before the last byte */
#define SHMB_VARINT_TOO_LONG (-2)  /* more than 5 (int32) or 10 (int64) bytes */

static inline uint32_t shmb_zigzag32_encode(int32_t v)
{
    uint32_t u = (uint32_t)v;
    return (u << 1) ^ (0u - (u >> 31));
}

static inline uint64_t shmb_zigzag64_encode(int64_t v)
{
    uint64_t u = (uint64_t)v;
    return (u << 1) ^ (0u - (u >> 63));
}

static inline int32_t shmb_zigzag32_decode(uint32_t u)
{
    return (int32_t)((u >> 1) ^ (0u - (u & 1u)));
}

static inline int64_t shmb_zigzag64_decode(uint64_t u)
{
    return (int64_t)((u >> 1) ^ ((uint64_t)0 - (u & 1u)));
}

/* Bytes the unsigned LEB128 form of u takes (1..10). */
static inline size_t shmb_uvarint_size(uint64_t u)
{
#if defined(__GNUC__)
    unsigned bits = 64u - (unsigned)__builtin_clzll(u | 1u);
    return (bits + 6u) / 7u;
#else
    size_t n = 1;
    while (u >= 0x80u) {
        u >>= 7;
        n++;
    }
    return n;
#endif
}

static inline size_t shmb_varint32_size(int32_t v) { return shmb_uvarint_size(shmb_zigzag32_encode(v)); }
static inline size_t shmb_varint64_size(int64_t v) { return shmb_uvarint_size(shmb_zigzag64_encode(v)); }

/* Writes u at p (room for shmb_uvarint_size(u) bytes); returns the bytes written. */
static inline size_t shmb_uvarint_write(uint8_t *p, uint64_t u)
{
    size_t n = 0;
    while (u >= 0x80u) {
        p[n++] = (uint8_t)(u | 0x80u);
        u >>= 7;
    }
    p[n++] = (uint8_t)u;
    return n;
}

static inline size_t shmb_varint32_write(uint8_t *p, int32_t v) { return shmb_uvarint_write(p, shmb_zigzag32_encode(v)); }
static inline size_t shmb_varint64_write(uint8_t *p, int64_t v) { return shmb_uvarint_write(p, shmb_zigzag64_encode(v)); }

/* Reads a zigzag int32 at *pp, never at or past end; advances *pp only on success.
 * Like Kafka's ByteUtils.readVarint, bits beyond 32 in the fifth byte are dropped. */
static inline int shmb_varint32_read(const uint8_t **pp, const uint8_t *end, int32_t *out)
{
    const uint8_t *p = *pp;
    uint32_t u = 0;
    for (unsigned shift = 0; shift < 7u * SHMB_VARINT32_BYTES_MAX; shift += 7) {
        if (p >= end)
            return SHMB_VARINT_TRUNCATED;
        uint32_t b = *p++;
        u |= (b & 0x7fu) << shift;
        if (b < 0x80u) {
            *pp = p;
            *out = shmb_zigzag32_decode(u);
            return SHMB_VARINT_OK;
        }
    }
    return SHMB_VARINT_TOO_LONG;
}

/* Reads a zigzag int64 at *pp, never at or past end; advances *pp only on success.
 * Like Kafka's ByteUtils.readVarlong, bits beyond 64 in the tenth byte are dropped. */
static inline int shmb_varint64_read(const uint8_t **pp, const uint8_t *end, int64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t u = 0;
    for (unsigned shift = 0; shift < 7u * SHMB_VARINT64_BYTES_MAX; shift += 7) {
        if (p >= end)
            return SHMB_VARINT_TRUNCATED;
        uint64_t b = *p++;
        u |= (b & 0x7fu) << shift;
        if (b < 0x80u) {
            *pp = p;
            *out = shmb_zigzag64_decode(u);
            return SHMB_VARINT_OK;
        }
    }
    return SHMB_VARINT_TOO_LONG;
}

#endif
