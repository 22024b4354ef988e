/* A producer's record accumulator: one RecordBatch v2 under construction, encoded record by
 * record as `send` is called, so that writing the batch is a header, a CRC and one copy into
 * the ingress ring (Kafka's RecordAccumulator/MemoryRecordsBuilder, reduced to one batch).
 *
 * Plain C, no Python. The bytes it produces are exactly shmb_rb_encode's for the same records
 * with their timestamps given explicitly (tests/native/test_accumulator.py checks that against
 * shmbroker/records/reference.py).
 *
 * Sizes: two limits, as Kafka's producer has them. `records_bytes_target` (batch.size) is when
 * a batch is full: a record that would take the records past it is refused (FULL: write the
 * batch, then append again). `records_bytes_max` (the topic's max.message.bytes and the ring's
 * largest frame) is the most one batch can ever hold: a record larger than it is TOO_LARGE,
 * and one between the two goes into an empty batch alone, as Kafka writes a record larger than
 * batch.size in a batch of its own.
 *
 * Timestamps: each record carries its own (CreateTime: the caller passes the time of the send,
 * or the application's); the batch's base timestamp is its first record's, and the others are
 * deltas from it, as Kafka's producer writes them.
 */
#ifndef SHMB_ACCUMULATOR_H
#define SHMB_ACCUMULATOR_H

#include <stddef.h>
#include <stdint.h>

#include "shmb/record_batch.h"

enum {
    SHMB_ACC_OK = 0,
    SHMB_ACC_FULL = 1,       /* the record would take the batch past its target: write first */
    SHMB_ACC_TOO_LARGE = 2,  /* the record is larger than records_bytes_max: no batch takes it */
    SHMB_ACC_BAD_TIMESTAMP = 3, /* its delta from the base timestamp overflows int64 */
    SHMB_ACC_NO_MEMORY = 4,
};

typedef struct {
    uint8_t *buf;              /* SHMB_RB_HEADER_SIZE bytes for the header, then the records */
    size_t cap;
    size_t len;                /* bytes used, the header's included */
    int32_t count;
    int64_t base_timestamp, max_timestamp;
    size_t records_bytes_max;  /* most bytes of records (header excluded) one batch may hold */
    size_t records_bytes_target; /* a batch is full past this many (<= records_bytes_max) */
} shmb_acc;

/* An empty accumulator whose target is its max; nothing is allocated until the first append. */
void shmb_acc_init(shmb_acc *a, size_t records_bytes_max);

/* Sets the target (batch.size), clamped to [1, records_bytes_max]. */
void shmb_acc_set_target(shmb_acc *a, size_t records_bytes_target);
void shmb_acc_free(shmb_acc *a);

/* Encodes one record at the end of the batch (offset delta = its index). SHMB_ACC_OK,
 * or a status above with nothing changed. `*record_bytes` (may be NULL): its encoded size. */
int shmb_acc_append(shmb_acc *a, int64_t timestamp, shmb_slice key, shmb_slice value,
                    const shmb_header_slice *headers, size_t nheaders, size_t *record_bytes);

/* Completes the header in a->buf (base offset 0 and leader epoch -1: the partition sets them)
 * and returns the batch's size; a->buf[0, size) is then the whole batch. count must be > 0.
 * The records stay: a batch whose ring write found no room is sealed again later. */
size_t shmb_acc_seal(shmb_acc *a, int64_t producer_id, int16_t producer_epoch,
                     int32_t base_sequence);

/* Forgets the records (keeps the buffer for the next batch). */
void shmb_acc_clear(shmb_acc *a);

#endif
