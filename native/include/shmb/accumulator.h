/* A producer's record accumulator: one RecordBatch v2 under construction, encoded record by
 * record as `send` is called, so that writing the batch is a header, a CRC and one copy into
 * the ingress ring (Kafka's RecordAccumulator/MemoryRecordsBuilder, reduced to one batch).
 *
 * Plain C, no Python. The bytes it produces are exactly shmb_rb_encode's for the same records
 * with their timestamps given explicitly (tests/native/test_accumulator.py checks that against
 * shmbroker/records/reference.py).
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
    SHMB_ACC_FULL = 1,       /* the record does not fit beside the ones held: write them first */
    SHMB_ACC_TOO_LARGE = 2,  /* the record does not fit even in an empty batch */
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
} shmb_acc;

/* An empty accumulator; nothing is allocated until the first append. */
void shmb_acc_init(shmb_acc *a, size_t records_bytes_max);
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
