/* Kafka's murmur2, line for line with org.apache.kafka.common.utils.Utils.murmur2 (Java int
 * arithmetic is done here in uint32_t, where overflow wraps the same way). */
#include "shmb/murmur2.h"

int32_t shmb_murmur2(const void *key, size_t len)
{
    const unsigned char *data = key;
    const uint32_t seed = 0x9747b28cu;
    const uint32_t m = 0x5bd1e995u;
    const unsigned r = 24;
    uint32_t h = seed ^ (uint32_t)len;
    size_t len4 = len / 4;

    for (size_t i = 0; i < len4; i++) {
        const unsigned char *q = data + 4 * i;
        uint32_t k = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 |
                     (uint32_t)q[3] << 24;
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
    }
    const unsigned char *tail = data + (len & ~(size_t)3);
    switch (len % 4) {
    case 3:
        h ^= (uint32_t)tail[2] << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t)tail[1] << 8;
        /* fall through */
    case 1:
        h ^= (uint32_t)tail[0];
        h *= m;
        break;
    default:
        break;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return (int32_t)h;
}

int32_t shmb_partition_for_key(const void *key, size_t len, int32_t num_partitions)
{
    uint32_t positive = (uint32_t)shmb_murmur2(key, len) & 0x7fffffffu;
    return (int32_t)(positive % (uint32_t)num_partitions);
}
