/* RecordBatch v2 (magic 2): encoder, scanner and decoder over plain pointers and lengths.
 *
 * The byte layout is docs/design/records.md and shmbroker/layout/record_batch.py; the numbers
 * come from the generated record_batch_layout.h. Plain C, no Python, no global state: every
 * function may run on any thread without the GIL.
 *
 * Safety rule: no function here reads outside [buf, buf + len), whatever the bytes say, and
 * none trusts a value it read earlier from a buffer that another thread might change.
 */
#ifndef SHMB_RECORD_BATCH_H
#define SHMB_RECORD_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "shmb/record_batch_layout.h"

/* Returned by shmb_rb_scan when its output array is full (not a layout status: it only means
 * "call again from *valid_bytes_out"). */
#define SHMB_RB_SCAN_MORE (-1)

/* Smallest record: length, attributes, timestamp delta, offset delta, key length, value length
 * and header count, one byte each. Bounds records_count before anything is allocated. */
#define SHMB_RB_RECORD_BYTES_MIN 7
/* Smallest header: key length and value length, one byte each. */
#define SHMB_RB_HEADER_BYTES_MIN 2

#define SHMB_RB_MESSAGE_BYTES_MAX 160

/* What went wrong and where: position is a byte offset into the buffer that was given. */
typedef struct {
    size_t position;      /* the batch (or record) at fault */
    size_t batch_position; /* the batch holding it */
    char message[SHMB_RB_MESSAGE_BYTES_MAX];
} shmb_rb_error;

/* The fixed 61-byte header, decoded (big-endian on the wire). */
typedef struct {
    int64_t base_offset;
    int32_t batch_length;
    int32_t partition_leader_epoch;
    int8_t magic;
    uint32_t crc;
    int16_t attributes;
    int32_t last_offset_delta;
    int64_t base_timestamp;
    int64_t max_timestamp;
    int64_t producer_id;
    int16_t producer_epoch;
    int32_t base_sequence;
    int32_t records_count;
} shmb_rb_header;

/* Decodes the header at p (at least SHMB_RB_HEADER_SIZE readable bytes). */
void shmb_rb_header_read(const uint8_t *p, shmb_rb_header *h);

/* ---- scanning ------------------------------------------------------------------------ */

typedef struct {
    int verify_crc;          /* compare the stored CRC with the bytes */
    int verify_records;      /* walk every record; a compressed batch: header checks only */
    int64_t batch_bytes_max; /* > 0: a batch (header included) larger than this is TOO_LARGE */
} shmb_rb_scan_opts;

typedef struct {
    size_t position;
    shmb_rb_header header;
} shmb_rb_batch_info;

/* Checks the batch starting at buf[pos] (pos <= len). Returns SHMB_RB_SCAN_OK and fills *h
 * (the batch takes h->batch_length + SHMB_RB_LOG_OVERHEAD bytes), or another SHMB_RB_SCAN_*
 * status and fills *err. The order of the checks is part of the contract (the reference's
 * _check_batch does the same): fewer than 12 bytes (TRUNCATED); batch_length below 49 or the
 * batch above batch_bytes_max (TOO_LARGE); magic, when its byte is there (BAD_MAGIC); fewer
 * bytes than the batch (TRUNCATED); CRC (BAD_CRC); then with verify_records compression
 * (COMPRESSED: a codec above 4) and the records (BAD_RECORD; of a compressed batch only
 * records_count against last_offset_delta, its records stay compressed). */
int shmb_rb_check_batch(const uint8_t *buf, size_t len, size_t pos, const shmb_rb_scan_opts *opts,
                        shmb_rb_header *h, shmb_rb_error *err);

/* Walks batches from buf[start]. Appends one shmb_rb_batch_info per valid batch to out
 * (room for out_cap) and sets *n_out and *valid_bytes_out (end of the last valid batch).
 * Returns SHMB_RB_SCAN_OK at a clean end of the buffer, SHMB_RB_SCAN_MORE when out is full
 * (call again with start = *valid_bytes_out), or the status of the first bad batch (which
 * starts at *valid_bytes_out; *err says why). */
int shmb_rb_scan(const uint8_t *buf, size_t len, size_t start, const shmb_rb_scan_opts *opts,
                 shmb_rb_batch_info *out, size_t out_cap, size_t *n_out, size_t *valid_bytes_out,
                 shmb_rb_error *err);

/* ---- walking a segment's batch headers ------------------------------------------------ */

/* shmb_rb_walk_to's statuses. */
#define SHMB_RB_WALK_FOUND 0      /* out->position, out->base: the batch holding the offset */
#define SHMB_RB_WALK_END 1        /* no whole batch holds it before end */
#define SHMB_RB_WALK_BAD_ENTRY 2  /* the first batch does not end at expected_last (a stale index) */
#define SHMB_RB_WALK_NOT_HEADER 3 /* corrupt: no whole batch header at out->position */
#define SHMB_RB_WALK_BAD_CHAIN 4  /* corrupt: out->base..out->last where out->expected_base was due */

typedef struct {
    size_t position;
    int64_t base;
    int64_t last;
    int64_t expected_base;
} shmb_rb_walk;

/* From the batch at buf[position], batch header by batch header (the bytes are not checked:
 * a read checks what it hands out), to the first batch whose last offset is >= offset; end
 * (<= the buffer's length) is where the log's bytes stop. expected_base >= 0: the first batch
 * must start there; expected_last >= 0: it must end there (it came from an index entry, so a
 * mismatch is BAD_ENTRY, as is a bad first header); after the first, base offsets must chain.
 * -1 means "no expectation". A last offset that overflows int64 counts as a broken chain.
 * The reference is LogReader._walk_reference (shmbroker/log/reader.py): same results. */
int shmb_rb_walk_to(const uint8_t *buf, size_t end, size_t position, int64_t offset,
                    int64_t expected_base, int64_t expected_last, shmb_rb_walk *out);

/* ---- decoding ------------------------------------------------------------------------ */

/* Where decoded records go: one entry per record, index first + i. Every pointer may be NULL
 * (that column is not written). Positions are byte offsets into the buffer; lengths -1 = null.
 * Offsets and timestamps wrap like Java's long arithmetic (base + delta). */
typedef struct {
    int64_t *offsets;
    int64_t *timestamps;
    int64_t *key_starts;
    int32_t *key_lengths;
    int64_t *value_starts;
    int32_t *value_lengths;
    int64_t *headers_starts; /* position of the first header's key length */
    int32_t *headers_counts;
} shmb_rb_columns;

/* Flags of shmb_rb_walk_records. */
#define SHMB_RB_WALK_CHECK_UTF8 1 /* header keys must be UTF-8 (the decoders build str keys) */

/* Walks the records of the (already checked) batch at buf[pos] with header *h, checking that
 * records_count, last_offset_delta (when records_count > 0) and every varint and length agree
 * with the batch size. Writes columns[first .. first + records_count) when cols is not NULL
 * (the caller makes room for h->records_count entries after checking it with
 * shmb_rb_records_count_ok). Returns SHMB_RB_SCAN_OK or SHMB_RB_SCAN_BAD_RECORD (with *err;
 * err->position is the record at fault). */
int shmb_rb_walk_records(const uint8_t *buf, size_t len, size_t pos, const shmb_rb_header *h,
                         const shmb_rb_columns *cols, size_t first, int flags, shmb_rb_error *err);

/* Whether len bytes at p are well-formed UTF-8 (as Python's strict decoder accepts them). */
int shmb_utf8_valid(const uint8_t *p, size_t len);

/* Whether records_count is possible for the batch size (0 <= count, count * 7 <= bytes). */
int shmb_rb_records_count_ok(const shmb_rb_header *h);

/* Returned by shmb_rb_decode when a valid batch does not fit in the columns (cap entries). */
#define SHMB_RB_DECODE_NO_ROOM (-2)

/* Records in the whole batches at the start of buf, trusting their headers (no CRC, no walk):
 * stops at the first header that is truncated, has a bad length or magic, or a records_count
 * that cannot fit. An upper bound of what shmb_rb_decode writes, for sizing its columns. */
size_t shmb_rb_count_records(const uint8_t *buf, size_t len);

/* Decodes every batch of buf into cols (room for cap entries), in order: checks each batch
 * like shmb_rb_check_batch (CRC when verify_crc), rejects compressed batches (COMPRESSED),
 * then walks its records (header keys must be UTF-8). Returns SHMB_RB_SCAN_OK with *n_out
 * records written, or the status of the first problem with *err. When the records do not all
 * fit in cap entries it still checks the whole buffer (so bad bytes are reported first) and
 * then returns SHMB_RB_DECODE_NO_ROOM (*n_out = records in the buffer; nothing is written
 * past cap). */
int shmb_rb_decode(const uint8_t *buf, size_t len, int verify_crc, const shmb_rb_columns *cols,
                   size_t cap, size_t *n_out, shmb_rb_error *err);

/* Parses one header (key, value) at *pp, bounded by end; advances *pp. Returns 0 or -1. */
int shmb_rb_header_next(const uint8_t **pp, const uint8_t *end, const uint8_t **key,
                        int32_t *key_length, const uint8_t **value, int32_t *value_length);

/* ---- encoding ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *data;
    int64_t length; /* -1: null */
} shmb_slice;

typedef struct {
    shmb_slice key; /* never null */
    shmb_slice value;
} shmb_header_slice;

typedef struct {
    size_t count;                      /* records, >= 1 */
    const shmb_slice *values;          /* count entries */
    const shmb_slice *keys;            /* count entries, or NULL: every key null */
    const size_t *header_starts;       /* count + 1 indexes into headers, or NULL: none */
    const shmb_header_slice *headers;
    const int64_t *timestamps;         /* count entries, or NULL: every record gets timestamp */
    int64_t timestamp;
    int64_t base_offset;
    int32_t partition_leader_epoch;
    int16_t attributes;                /* compression bits must be 0 */
    int64_t producer_id;
    int16_t producer_epoch;
    int32_t base_sequence;
} shmb_rb_encode_input;

/* Size of the batch in->... encodes to. Returns 0, or -1 with *err when it cannot be encoded
 * (no records, compression bits set, a length or the batch over INT32_MAX, a timestamp delta
 * outside int64). */
int shmb_rb_encoded_size(const shmb_rb_encode_input *in, size_t *size_out, shmb_rb_error *err);

/* Writes the batch into out (exactly size bytes, from shmb_rb_encoded_size), CRC included. */
void shmb_rb_encode(const shmb_rb_encode_input *in, uint8_t *out, size_t size);

/* The pieces shmb_rb_encode is made of, for encoders that build a batch record by record
 * (accumulator.h). Bytes of one record after its length varint: */
size_t shmb_rb_record_body_size(int32_t index, int64_t delta, shmb_slice key, shmb_slice value,
                                const shmb_header_slice *headers, size_t nheaders);

/* Writes one record (its length varint first) at p; returns the end. body_size is
 * shmb_rb_record_body_size of the same arguments. A null key is {NULL, -1}. */
uint8_t *shmb_rb_put_record(uint8_t *p, size_t body_size, int32_t index, int64_t delta,
                            shmb_slice key, shmb_slice value, const shmb_header_slice *headers,
                            size_t nheaders);

/* Writes the 61-byte header of a batch of `size` bytes (records already at out + HEADER_SIZE)
 * from h's fields (batch_length, magic and crc are computed, not read), the CRC last. */
void shmb_rb_put_header(uint8_t *out, size_t size, const shmb_rb_header *h);

/* ---- a ring frame's offsets (decision 0005) ------------------------------------------ */

/* Offsets one ring frame's payload takes: the sum of lastOffsetDelta + 1 (1 for a negative
 * delta) over its batches, walked by batchLength while a whole header remains and batchLength
 * is at least SHMB_RB_BATCH_LENGTH_MIN; at least 1, whatever the bytes. The producer reserves
 * this many at its commit and the partition process reads a frame's span with the same walk,
 * so a frame it refuses (bad batch) still has a known span to fill. */
uint64_t shmb_frame_offsets(const uint8_t *p, size_t len);

/* Sets the baseOffset of each batch of the walk above to consecutive values from `base` (the
 * first batch's at bytes 0..8 whatever the walk finds; len >= SHMB_RB_HEADER_SIZE). baseOffset
 * lies outside the batch CRC. */
void shmb_frame_set_base(uint8_t *p, size_t len, int64_t base);

/* The first batch's baseOffset (len >= 8): where a committed frame's offsets start. */
int64_t shmb_frame_base(const uint8_t *p);

/* The partition's rule for a batch of a ring frame, the one function behind both the round's
 * check (drain.c) and a consumer reading rings (shmb_ring_frame_at), so that both refuse
 * exactly the same frames: the batch at buf[pos] passes shmb_rb_check_batch with the CRC and
 * the records checked and batch_bytes_max, has 1..records_max records and is not a control
 * batch. 1 (and *h filled) or 0. */
int shmb_frame_batch_ok(const uint8_t *buf, size_t end, size_t pos, int64_t batch_bytes_max,
                        int64_t records_max, shmb_rb_header *h);

/* Every batch of a frame's payload passes shmb_frame_batch_ok and they fill it exactly
 * (an empty payload does not): 1 or 0. */
int shmb_frame_ok(const uint8_t *p, size_t len, int64_t batch_bytes_max, int64_t records_max);

#endif
