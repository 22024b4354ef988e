/* Contract: shmb/accumulator.h. */
#include "shmb/accumulator.h"

#include <stdlib.h>
#include <string.h>

#include "shmb/varint.h"

/* First allocation: a few small records without a realloc. */
#define ACC_INITIAL_BYTES 4096

void shmb_acc_init(shmb_acc *a, size_t records_bytes_max)
{
    memset(a, 0, sizeof *a);
    a->len = SHMB_RB_HEADER_SIZE;
    a->records_bytes_max = records_bytes_max;
    a->records_bytes_target = records_bytes_max;
}

void shmb_acc_set_target(shmb_acc *a, size_t records_bytes_target)
{
    if (records_bytes_target < 1)
        records_bytes_target = 1;
    a->records_bytes_target = records_bytes_target < a->records_bytes_max
                                  ? records_bytes_target : a->records_bytes_max;
}

void shmb_acc_free(shmb_acc *a)
{
    free(a->buf);
    a->buf = NULL;
    a->cap = 0;
    shmb_acc_clear(a);
}

void shmb_acc_clear(shmb_acc *a)
{
    a->len = SHMB_RB_HEADER_SIZE;
    a->count = 0;
    a->base_timestamp = a->max_timestamp = 0;
}

static int reserve(shmb_acc *a, size_t need)
{
    if (need <= a->cap)
        return 0;
    size_t cap = a->cap ? a->cap : ACC_INITIAL_BYTES;
    while (cap < need)
        cap *= 2;
    uint8_t *b = realloc(a->buf, cap);
    if (b == NULL)
        return -1;
    a->buf = b;
    a->cap = cap;
    return 0;
}

int shmb_acc_append(shmb_acc *a, int64_t timestamp, shmb_slice key, shmb_slice value,
                    const shmb_header_slice *headers, size_t nheaders, size_t *record_bytes)
{
    int64_t base = a->count ? a->base_timestamp : timestamp, delta;
    if (__builtin_sub_overflow(timestamp, base, &delta))
        return SHMB_ACC_BAD_TIMESTAMP;
    size_t body = shmb_rb_record_body_size(a->count, delta, key, value, headers, nheaders);
    size_t size = shmb_varint32_size((int32_t)body) + body;
    if (record_bytes != NULL)
        *record_bytes = size;
    if (body > INT32_MAX || size > a->records_bytes_max)
        return SHMB_ACC_TOO_LARGE;
    /* An empty batch takes any record up to the max, however far past the target. */
    if (a->count == INT32_MAX ||
        (a->count > 0 && (a->len - SHMB_RB_HEADER_SIZE) + size > a->records_bytes_target))
        return SHMB_ACC_FULL;
    if (reserve(a, a->len + size) < 0)
        return SHMB_ACC_NO_MEMORY;
    uint8_t *end = shmb_rb_put_record(a->buf + a->len, body, a->count, delta, key, value,
                                      headers, nheaders);
    a->len = (size_t)(end - a->buf);
    if (a->count == 0)
        a->base_timestamp = a->max_timestamp = timestamp;
    else if (timestamp > a->max_timestamp)
        a->max_timestamp = timestamp;
    a->count++;
    return SHMB_ACC_OK;
}

size_t shmb_acc_seal(shmb_acc *a, int64_t producer_id, int16_t producer_epoch,
                     int32_t base_sequence)
{
    const shmb_rb_header h = {
        .base_offset = 0,
        .partition_leader_epoch = -1,
        .attributes = 0,
        .last_offset_delta = a->count - 1,
        .base_timestamp = a->base_timestamp,
        .max_timestamp = a->max_timestamp,
        .producer_id = producer_id,
        .producer_epoch = producer_epoch,
        .base_sequence = base_sequence,
        .records_count = a->count,
    };
    shmb_rb_put_header(a->buf, a->len, &h);
    return a->len;
}
