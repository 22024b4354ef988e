/* Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2): the default partitioner's
 * hash of a record key. Plain C, no Python, no state. */
#ifndef SHMB_MURMUR2_H
#define SHMB_MURMUR2_H

#include <stddef.h>
#include <stdint.h>

/* murmur2 with seed 0x9747b28c, as a signed int32 exactly like Java's int result. */
int32_t shmb_murmur2(const void *key, size_t len);

/* Kafka's partition for a keyed record: (murmur2(key) & 0x7fffffff) % num_partitions.
 * num_partitions must be > 0. */
int32_t shmb_partition_for_key(const void *key, size_t len, int32_t num_partitions);

#endif
