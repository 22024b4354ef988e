/* One drain round in one call. Contract and phases: shmb/drain.h. The reference is the Python
 * round, Drainer.round in shmbroker/partition/drain.py; every rule here names the Python line
 * it mirrors, so a change to one side is easy to carry to the other. */
#include "shmb/drain.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shmb/byte_order.h"
#include "shmb/futex.h"
#include "shmb/record_batch.h"
#include "shmb/shm_atomic.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shared-memory layouts are little-endian; this file stores native integers"
#endif

/* Frames read per shmb_ring_read call (a stack array; the loop asks again while it fills). */
#define READ_CHUNK_FRAMES 128
/* A write interrupted by signals this many times in a row is an error, not a loop forever. */
#define WRITE_EINTR_MAX 1000
#define INT32_RELATIVE_MAX 0x7FFFFFFFLL

/* One ring's frames that continue the log back to back: one completion. */
typedef struct {
    shmb_drain_ring *ring;
    uint64_t first_sequence;
    uint32_t count;
    int64_t base_offset;
} run;

typedef struct {
    size_t position; /* in scratch */
    uint64_t size;
    int64_t base_offset, last_offset, max_timestamp;
    int32_t records;
} planned_batch;

/* Growing arrays of the round; freed by round_free. */
typedef struct {
    uint32_t *frame_lens;
    size_t frames, frames_cap;
    planned_batch *batches;
    size_t batches_count, batches_cap;
    run *runs; /* in log order: one completion each */
    size_t runs_count, runs_cap;
    uint64_t records;
} round_state;

static void round_free(round_state *s)
{
    free(s->frame_lens);
    free(s->batches);
    free(s->runs);
}

static int grow(void **p, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    size_t cap2 = *cap ? *cap * 2 : 64;
    while (cap2 < need)
        cap2 *= 2;
    void *q = realloc(*p, cap2 * item);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = cap2;
    return 0;
}

/* RingConsumer.completions_full: the producer has COMPLETIONS_MAX completions unread (and
 * wants them: completions_off is 0). */
static int completions_full(const uint8_t *region)
{
    if (shmb_u32_load_seq_cst(region + SHMB_RING_COMPLETIONS_OFF_OFFSET))
        return 0;
    uint64_t written = shmb_u64_load_seq_cst(region + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET);
    uint64_t read = shmb_u64_load_seq_cst(region + SHMB_RING_COMPLETIONS_READ_OFFSET);
    return written - read >= SHMB_COMPLETIONS_MAX;
}

/* Completions the producer has room for (SIZE_MAX: it wants none, completions_off). */
static size_t completions_free(const uint8_t *region)
{
    if (shmb_u32_load_seq_cst(region + SHMB_RING_COMPLETIONS_OFF_OFFSET))
        return SIZE_MAX;
    uint64_t written = shmb_u64_load_seq_cst(region + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET);
    uint64_t read = shmb_u64_load_seq_cst(region + SHMB_RING_COMPLETIONS_READ_OFFSET);
    uint64_t unread = written - read;
    return unread >= SHMB_COMPLETIONS_MAX ? 0 : (size_t)(SHMB_COMPLETIONS_MAX - unread);
}

/* ---- phase 1: collect ------------------------------------------------------------------- */

/* The base offset the producer's commit wrote into a frame (-1: too short to hold a batch). */
static int64_t frame_base_of(const uint8_t *payload, size_t len)
{
    return len >= SHMB_RB_HEADER_SIZE ? shmb_frame_base(payload) : -1;
}

/* The ring's first unread committed frame: 1 and its base offset, 0 when none (a lone padding
 * frame is stepped over: next_position moves), or a SHMB_DRAIN_DECLINE_* code (negated). */
static int peek_base(shmb_drain_ring *r, int64_t *base)
{
    shmb_ring_frame f;
    size_t got = 0;
    uint64_t next;
    if (shmb_ring_read(r->region, r->region_len, r->next_position, r->expected_sequence, 0, 1,
                       &f, 1, &got, &next, NULL) != SHMB_RING_OK)
        return -SHMB_DRAIN_DECLINE_RING_CORRUPT; /* the Python round marks it broken */
    if (got == 0) {
        r->next_position = next;
        return 0;
    }
    *base = frame_base_of(r->region + f.payload_offset, f.payload_len);
    return 1;
}

/* One ring's run into scratch (Drainer._take_run + the join): its committed frames from
 * `position` while each starts at *next (the offset after the previous one), at most max_bytes
 * of them (the first always). Bases and spans are read from the copy, which is what gets
 * written. Returns 0 or a SHMB_DRAIN_DECLINE_* code. */
static int collect_ring(shmb_drain_ring *r, uint64_t max_bytes, int64_t *next, round_state *s,
                        uint8_t *scratch, size_t scratch_len, size_t *used)
{
    shmb_ring_frame chunk[READ_CHUNK_FRAMES];
    uint32_t before = r->count;
    r->head = 0; /* unless the run ends at a frame of its own that comes later in the log */
    /* Bounded: each pass takes READ_CHUNK_FRAMES frames or ends the loop. */
    while (r->count < SHMB_DRAIN_RING_FRAMES_MAX &&
           (r->count == before || r->bytes < max_bytes)) {
        size_t room = SHMB_DRAIN_RING_FRAMES_MAX - r->count, got = 0;
        if (room > READ_CHUNK_FRAMES)
            room = READ_CHUNK_FRAMES;
        uint64_t left = r->bytes < max_bytes ? max_bytes - r->bytes : 0;
        uint64_t chunk_start = r->next_position, chunk_seq = r->expected_sequence + r->count;
        if (shmb_ring_read(r->region, r->region_len, chunk_start, chunk_seq, left,
                           r->count == before, chunk, room, &got, &r->next_position,
                           NULL) != SHMB_RING_OK)
            return SHMB_DRAIN_DECLINE_RING_CORRUPT; /* the Python round marks it broken */
        if (grow((void **)&s->frame_lens, &s->frames_cap, s->frames + got, sizeof(uint32_t)))
            return SHMB_DRAIN_DECLINE_NO_MEMORY;
        size_t k = 0;
        for (; k < got; k++) {
            size_t len = chunk[k].payload_len;
            if (len > scratch_len - *used)
                return SHMB_DRAIN_DECLINE_SCRATCH_FULL;
            uint8_t *copy = scratch + *used;
            memcpy(copy, r->region + chunk[k].payload_offset, len);
            int64_t base = frame_base_of(copy, len);
            if (base != *next) {
                /* Another ring's frame comes first: the run ends here; this one is the
                 * ring's head for a later run of the round. */
                r->head = base > *next;
                r->head_base = base;
                break;
            }
            *next += (int64_t)shmb_frame_offsets(copy, len);
            *used += len;
            r->bytes += len;
            s->frame_lens[s->frames++] = (uint32_t)len;
        }
        r->count += (uint32_t)k;
        if (k < got) {
            /* Where the k-th frame of the chunk ends: read those k again (rare: producers
             * whose commits interleave). */
            size_t again = 0;
            r->next_position = chunk_start;
            if (k > 0 && (shmb_ring_read(r->region, r->region_len, chunk_start, chunk_seq,
                                         UINT64_MAX, 1, chunk, k, &again, &r->next_position,
                                         NULL) != SHMB_RING_OK || again != k))
                return SHMB_DRAIN_DECLINE_RING_CORRUPT;
            break;
        }
        if (got < room)
            break;
    }
    return 0;
}

/* Drainer._collect: from the log end, the ring whose first frame continues the log gives its
 * run, then the next one that continues, each ring once; held-back rings are skipped (and
 * nudged in phase 3), the budget counts each taken ring's bytes and the round stops once it
 * is used up. Declines BEHIND for a frame below the log end (the Python round settles it)
 * and HOLE when a ring has frames but none continues the log (the Python round waits for the
 * producer in its reservation, or fills the offsets of one that died). */
static int collect(shmb_drain_ring *rings, size_t n, const shmb_drain_log *log, round_state *s,
                   uint8_t *scratch, size_t scratch_len, size_t *used)
{
    int64_t budget = (int64_t)log->round_bytes_max;
    int64_t next = log->log_end_offset;
    size_t readable = 0;
    for (size_t i = 0; i < n; i++) {
        shmb_drain_ring *r = &rings[i];
        r->next_position = r->position;
        r->count = 0;
        r->held_back = 0;
        r->bytes = 0;
        r->base_offset = -1;
        r->release_failed = 0;
        r->head = 0;
        r->runs = 0;
        /* RingConsumer.poll's order: the completions first (a held-back ring is not read,
         * so its header is not checked either), then the read, which checks the header. */
        if (r->region_len < SHMB_RING_DATA_OFFSET)
            return SHMB_DRAIN_DECLINE_RING_CORRUPT;
        r->completions_free = completions_free(r->region);
        if (r->completions_free == 0) {
            r->held_back = 1;
            continue;
        }
        int found = peek_base(r, &r->head_base);
        if (found < 0)
            return -found;
        r->head = found;
        if (found && r->head_base < next)
            return SHMB_DRAIN_DECLINE_BEHIND;
        readable += (size_t)found;
    }
    /* Bounded: each pass takes at least one frame (of SHMB_DRAIN_RING_FRAMES_MAX per ring)
     * or ends the loop. */
    for (;;) {
        shmb_drain_ring *r = NULL;
        for (size_t i = 0; i < n && r == NULL; i++)
            if (rings[i].head && rings[i].head_base == next)
                r = &rings[i];
        if (r == NULL || r->count >= SHMB_DRAIN_RING_FRAMES_MAX)
            break;
        /* One completion per run: a ring with no room for one more ends the round (the
         * Python round has the same rule; one with no room at all was held back above). */
        if (r->runs >= r->completions_free)
            break;
        if (grow((void **)&s->runs, &s->runs_cap, s->runs_count + 1, sizeof(run)))
            return SHMB_DRAIN_DECLINE_NO_MEMORY;
        run *u = &s->runs[s->runs_count++];
        u->ring = r;
        u->first_sequence = r->expected_sequence + r->count;
        u->base_offset = next;
        uint32_t had = r->count;
        uint64_t had_bytes = r->bytes;
        if (r->base_offset < 0)
            r->base_offset = next;
        int d = collect_ring(r, log->ring_round_bytes_max, &next, s, scratch, scratch_len, used);
        if (d)
            return d;
        u->count = r->count - had;
        r->runs++;
        budget -= (int64_t)(r->bytes - had_bytes);
        if (budget <= 0)
            break;
    }
    if (readable > 0 && s->frames == 0)
        return SHMB_DRAIN_DECLINE_HOLE;
    return 0;
}

/* ---- phase 2: check --------------------------------------------------------------------- */

/* PartitionLog._validate for one frame: whole, valid batches only. */
static int check_frame(const uint8_t *scratch, size_t at, size_t len, const shmb_drain_log *log,
                       round_state *s)
{
    size_t end = at + len, pos = at;
    if (len == 0)
        return SHMB_DRAIN_DECLINE_BAD_FRAME; /* "no batch": the Python round rejects it */
    while (pos < end) { /* bounded: every batch is at least a header long */
        shmb_rb_header h;
        /* The rule consumers reading rings apply too (shmb_ring_frame_at). */
        if (!shmb_frame_batch_ok(scratch, end, pos, log->batch_bytes_max,
                                 log->batch_records_max, &h))
            return SHMB_DRAIN_DECLINE_BAD_FRAME;
        if (grow((void **)&s->batches, &s->batches_cap, s->batches_count + 1,
                 sizeof(planned_batch)))
            return SHMB_DRAIN_DECLINE_NO_MEMORY;
        planned_batch *b = &s->batches[s->batches_count++];
        b->position = pos;
        b->size = (uint64_t)h.batch_length + SHMB_RB_LOG_OVERHEAD;
        b->max_timestamp = h.max_timestamp;
        b->records = h.records_count;
        b->last_offset = h.last_offset_delta; /* planned in plan_offsets */
        s->records += (uint64_t)h.records_count;
        pos += (size_t)b->size;
    }
    return 0;
}

/* plan_batches + the OFFSET_MAX check of _validate. */
static int plan_offsets(round_state *s, const shmb_drain_log *log, const uint8_t *scratch_base)
{
    int64_t next = log->log_end_offset;
    for (size_t i = 0; i < s->batches_count; i++) {
        planned_batch *b = &s->batches[i];
        int64_t last;
        if (__builtin_add_overflow(next, b->last_offset, &last) || last > log->last_offset_max)
            return SHMB_DRAIN_DECLINE_OFFSET_LIMIT;
        b->base_offset = next;
        b->last_offset = last;
        next = last + 1;
        /* The producer's commit set every batch's base offset (decision 0005); a batch whose
         * own says otherwise is refused by the Python round (its frame-by-frame path). */
        if (i > 0 && (int64_t)be64(scratch_base + b->position) != b->base_offset)
            return SHMB_DRAIN_DECLINE_BAD_FRAME;
    }
    return 0;
}

/* PartitionLog._write without a roll: segment.ms (time_waited_for_roll), then room_for/_fits
 * for every batch as one group. Stricter than _write where it is cheaper to be: a round that
 * would need two writes to one segment is declined too. */
static int check_no_roll(const round_state *s, const shmb_drain_log *log)
{
    size_t nb = s->batches_count;
    int64_t incoming_max = INT64_MIN;
    for (size_t i = 0; i < nb; i++)
        if (s->batches[i].max_timestamp > incoming_max)
            incoming_max = s->batches[i].max_timestamp;
    if (log->segment_size > 0) {
        int64_t first = log->first_batch_max_timestamp;
        int64_t waited = first >= 0 ? incoming_max - first : log->now_ms - log->created_ms;
        if (waited > log->segment_ms)
            return SHMB_DRAIN_DECLINE_ROLL_DUE;
    }
    if (log->offset_entries_left < (int64_t)nb + 1 || log->time_entries_left < (int64_t)nb + 2)
        return SHMB_DRAIN_DECLINE_ROLL_DUE;
    uint64_t total = 0;
    for (size_t i = 0; i < nb; i++) {
        total += s->batches[i].size;
        /* An empty segment takes its first batch whatever its size (room_for). */
        if ((log->segment_size > 0 || i > 0) && log->segment_size + total > log->segment_bytes)
            return SHMB_DRAIN_DECLINE_ROLL_DUE;
        if (s->batches[i].last_offset - log->segment_base_offset > INT32_RELATIVE_MAX)
            return SHMB_DRAIN_DECLINE_ROLL_DUE;
    }
    return 0;
}

/* Everything that makes the Python round do more than append + publish + complete. */
static int check_round(shmb_drain_ring *rings, size_t n, uint8_t *control, size_t control_len,
                       uint64_t records, const round_state *s, const shmb_drain_log *log)
{
    for (size_t i = 0; i < n; i++) {
        if (rings[i].count && shmb_u32_load_seq_cst(rings[i].region +
                                                    SHMB_RING_FSYNC_REQUIRED_OFFSET))
            return SHMB_DRAIN_DECLINE_FSYNC_REQUIRED;
    }
    int d = check_no_roll(s, log);
    if (d)
        return d;
    if (log->flush_due ||
        (log->flush_records_left >= 0 && (int64_t)records >= log->flush_records_left))
        return SHMB_DRAIN_DECLINE_FLUSH_DUE;
    /* ControlRegion.publish asserts this; take_ownership made it even. */
    if (shmb_u64_load_seq_cst(control + SHMB_CTL_STATE_SEQ_OFFSET) & 1)
        return SHMB_DRAIN_DECLINE_STATE_ODD;
    return 0;
}

/* LogSegment.append's patched prefix and _index_batches' IndexRule, on the scratch copy. */
static int patch_and_index(round_state *s, uint8_t *scratch, const shmb_drain_log *log,
                           shmb_drain_result *out)
{
    size_t nb = s->batches_count;
    out->offset_entries = malloc(nb * sizeof(shmb_drain_entry));
    out->time_entries = malloc(nb * sizeof(shmb_drain_entry));
    if (out->offset_entries == NULL || out->time_entries == NULL)
        return SHMB_DRAIN_DECLINE_NO_MEMORY;
    int64_t since = log->bytes_since_entry, max_ts = log->max_timestamp;
    int64_t max_off = log->offset_of_max_timestamp;
    uint64_t position = log->segment_size;
    for (size_t i = 0; i < nb; i++) {
        planned_batch *b = &s->batches[i];
        put_be64(scratch + b->position + SHMB_RB_BASE_OFFSET_OFFSET, (uint64_t)b->base_offset);
        put_be32(scratch + b->position + SHMB_RB_PARTITION_LEADER_EPOCH_OFFSET,
                 (uint32_t)log->leader_epoch);
        if (b->max_timestamp > max_ts) { /* IndexRule.observe */
            max_ts = b->max_timestamp;
            max_off = b->last_offset;
        }
        if (since > log->interval_bytes) {
            since = 0;
            out->offset_entries[out->offset_entries_count++] =
                (shmb_drain_entry){b->last_offset, (int64_t)position};
            out->time_entries[out->time_entries_count++] = (shmb_drain_entry){max_ts, max_off};
        }
        since += (int64_t)b->size;
        if (position == 0) {
            out->first_batch_set = 1;
            out->first_batch_max_timestamp = b->max_timestamp;
        }
        position += b->size;
    }
    out->bytes_since_entry = since;
    out->max_timestamp = max_ts;
    out->offset_of_max_timestamp = max_off;
    out->segment_size = position;
    out->log_end_offset = s->batches[nb - 1].last_offset + 1;
    out->batches = nb;
    return 0;
}

/* ---- phase 3: act ----------------------------------------------------------------------- */

/* RingConsumer._nudge_producer. */
static void nudge(uint8_t *region)
{
    if (shmb_u32_load_seq_cst(region + SHMB_RING_SPACE_WAITING_OFFSET)) {
        shmb_u32_fetch_add(region + SHMB_RING_SPACE_SEQ_OFFSET, 1);
        shmb_futex_wake((uint32_t *)(region + SHMB_RING_SPACE_SEQ_OFFSET), INT_MAX);
    }
}

/* LogSegment.append's write: everything or an error (short writes resume). */
static int write_all(int fd, const uint8_t *p, size_t len, int *err)
{
    size_t done = 0;
    unsigned eintr = 0;
    while (done < len) { /* bounded: each pass writes a byte, fails, or counts an EINTR */
        ssize_t w = write(fd, p + done, len - done);
        if (w < 0) {
            if (errno == EINTR && ++eintr < WRITE_EINTR_MAX)
                continue;
            *err = errno;
            return -1;
        }
        if (w == 0) {
            *err = EIO;
            return -1;
        }
        done += (size_t)w;
    }
    return 0;
}

/* ControlRegion.publish: seqlock odd, fields, even; hw_seq; wake consumers. */
static void publish(uint8_t *control, const shmb_drain_log *log, const shmb_drain_result *out)
{
    uint64_t seq = shmb_u64_load_seq_cst(control + SHMB_CTL_STATE_SEQ_OFFSET);
    int64_t hw = out->log_end_offset, start = log->log_start_offset;
    int64_t base = log->segment_base_offset, end = (int64_t)out->segment_size;
    shmb_u64_store_seq_cst(control + SHMB_CTL_STATE_SEQ_OFFSET, seq + 1);
    memcpy(control + SHMB_CTL_HIGH_WATERMARK_OFFSET, &hw, 8);
    memcpy(control + SHMB_CTL_LOG_START_OFFSET_OFFSET, &start, 8);
    memcpy(control + SHMB_CTL_ACTIVE_SEGMENT_BASE_OFFSET_OFFSET, &base, 8);
    memcpy(control + SHMB_CTL_ACTIVE_SEGMENT_END_POSITION_OFFSET, &end, 8);
    memcpy(control + SHMB_CTL_PARTITION_PID_OFFSET, &log->pid, 4);
    memcpy(control + SHMB_CTL_LEADER_EPOCH_OFFSET, &log->leader_epoch, 4);
    memcpy(control + SHMB_CTL_PARTITION_START_TIME_OFFSET, &log->start_time, 8);
    shmb_u64_store_seq_cst(control + SHMB_CTL_STATE_SEQ_OFFSET, seq + 2);
    shmb_u32_fetch_add(control + SHMB_CTL_HW_SEQ_OFFSET, 1);
    if (shmb_u32_load_seq_cst(control + SHMB_CTL_HW_WAITERS_OFFSET))
        shmb_futex_wake((uint32_t *)(control + SHMB_CTL_HW_SEQ_OFFSET), INT_MAX);
}

/* RingConsumer.complete (error_code 0) of one run. */
static void complete(const run *u)
{
    uint8_t *region = u->ring->region;
    uint64_t written = shmb_u64_load_seq_cst(region + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET);
    uint8_t *c = region + SHMB_RING_COMPLETIONS_OFFSET +
                 (written % SHMB_COMPLETIONS_MAX) * SHMB_COMPLETION_BYTES;
    uint64_t first = u->first_sequence, last = u->first_sequence + u->count - 1;
    int32_t code = 0;
    memset(c, 0, SHMB_COMPLETION_BYTES); /* the padding too, as struct.pack_into writes it */
    memcpy(c + SHMB_COMPL_FIRST_SEQUENCE_OFFSET, &first, 8);
    memcpy(c + SHMB_COMPL_LAST_SEQUENCE_OFFSET, &last, 8);
    memcpy(c + SHMB_COMPL_BASE_OFFSET_OFFSET, &u->base_offset, 8);
    memcpy(c + SHMB_COMPL_ERROR_CODE_OFFSET, &code, 4);
    shmb_u64_store_seq_cst(region + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET, written + 1);
    shmb_u64_store_seq_cst(region + SHMB_RING_ACKED_SEQUENCE_OFFSET, last + 1);
    shmb_u32_fetch_add(region + SHMB_RING_ACK_SEQ_OFFSET, 1);
    if (shmb_u32_load_seq_cst(region + SHMB_RING_ACK_WAITING_OFFSET))
        shmb_futex_wake((uint32_t *)(region + SHMB_RING_ACK_SEQ_OFFSET), INT_MAX);
}

/* Steps 2-6 of drain.py's module doc, in that order. */
static int act(shmb_drain_ring *rings, size_t n, const round_state *s, uint8_t *control,
               size_t control_len, const uint8_t *scratch, size_t used,
               const shmb_drain_log *log, shmb_drain_result *out)
{
    if (write_all(log->fd, scratch, used, &out->write_errno) < 0) {
        /* LogSegment._undo_partial_write: no torn batch stays behind. */
        out->truncated = ftruncate(log->fd, (off_t)log->segment_size) == 0;
        return SHMB_DRAIN_WRITE_FAILED;
    }
    if (log->stop_after == SHMB_DRAIN_STOP_AFTER_WRITE)
        return SHMB_DRAIN_DONE;
    publish(control, log, out); /* before complete: an acked record is always readable */
    if (log->stop_after == SHMB_DRAIN_STOP_AFTER_PUBLISH)
        return SHMB_DRAIN_DONE;
    for (size_t k = 0; k < s->runs_count; k++)
        complete(&s->runs[k]);
    if (log->stop_after == SHMB_DRAIN_STOP_AFTER_COMPLETE)
        return SHMB_DRAIN_DONE;
    for (size_t i = 0; i < n; i++)
        if (rings[i].count &&
            shmb_ring_release(rings[i].region, rings[i].region_len, rings[i].next_position,
                              &rings[i].release_err) != SHMB_RING_OK)
            rings[i].release_failed = 1;
    return SHMB_DRAIN_DONE;
}

/* ---- the round -------------------------------------------------------------------------- */

static int decline(shmb_drain_result *out, int why)
{
    free(out->offset_entries);
    free(out->time_entries);
    memset(out, 0, sizeof *out);
    out->decline = why;
    return SHMB_DRAIN_DECLINED;
}

int shmb_drain_round(shmb_drain_ring *rings, size_t n, uint8_t *control, size_t control_len,
                     uint8_t *scratch, size_t scratch_len, const shmb_drain_log *log,
                     shmb_drain_result *out)
{
    round_state s;
    size_t used = 0;
    memset(&s, 0, sizeof s);
    memset(out, 0, sizeof *out);
    int d = collect(rings, n, log, &s, scratch, scratch_len, &used);
    /* The scratch holds the round's frames back to back in log order (collect). */
    for (size_t frame = 0, at = 0; d == 0 && frame < s.frames; frame++) {
        d = check_frame(scratch, at, s.frame_lens[frame], log, &s);
        at += s.frame_lens[frame];
    }
    if (d == 0 && s.frames > 0)
        d = plan_offsets(&s, log, scratch);
    if (d == 0 && s.frames > 0)
        d = check_round(rings, n, control, control_len, s.records, &s, log);
    if (d == 0 && s.frames > 0)
        d = patch_and_index(&s, scratch, log, out);
    if (d) {
        round_free(&s);
        return decline(out, d);
    }
    /* From here on, shared memory and the log change. */
    for (size_t i = 0; i < n; i++)
        if (rings[i].held_back)
            nudge(rings[i].region);
    out->frames = s.frames;
    out->records = s.records;
    out->bytes = used;
    int status = SHMB_DRAIN_DONE;
    if (s.frames > 0)
        status = act(rings, n, &s, control, control_len, scratch, used, log, out);
    round_free(&s);
    return status;
}

void shmb_drain_result_free(shmb_drain_result *r)
{
    free(r->offset_entries);
    free(r->time_entries);
    r->offset_entries = r->time_entries = NULL;
}

/* ---- the loop's last look before it sleeps ---------------------------------------------- */

int shmb_drain_ring_readable(const shmb_drain_look *ring)
{
    /* RingConsumer.has_unread, then completions_full, in that order (both are loads). */
    uint64_t at = SHMB_RING_DATA_OFFSET + (ring->position & (ring->capacity - 1));
    if (ring->region_len < SHMB_RING_DATA_OFFSET || at > ring->region_len - 4)
        return -1;
    if (shmb_u32_load_seq_cst(ring->region + at) == 0)
        return 0;
    return !completions_full(ring->region);
}

int64_t shmb_drain_sleep_prepare(uint8_t *control, int64_t registry_seen,
                                 const shmb_drain_look *rings, size_t n)
{
    /* ControlRegion.sleep_prepare: seq_cst store, then loads (Dekker with the producers'
     * doorbell_ring, which publishes its frame, fences, then loads the flag). */
    uint32_t seen = shmb_u32_load_seq_cst(control + SHMB_CTL_DOORBELL_OFFSET);
    shmb_u32_store_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET, SHMB_PARTITION_MAY_SLEEP);
    if (registry_seen < 0 ||
        shmb_u32_load_seq_cst(control + SHMB_CTL_REGISTRY_CHANGES_OFFSET) !=
            (uint32_t)registry_seen)
        return -1;
    for (size_t i = 0; i < n; i++) { /* bounded by n */
        int r = shmb_drain_ring_readable(&rings[i]);
        if (r != 0)
            return r < 0 ? -2 : -1;
    }
    return (int64_t)seen;
}

int shmb_drain_sleep(uint8_t *control, uint32_t seen, int64_t timeout_ms, int64_t spin_ns,
                     int64_t doze_ms)
{
    const uint32_t *doorbell = (const uint32_t *)(control + SHMB_CTL_DOORBELL_OFFSET);
    int64_t start = shmb_monotonic_ns();
    int r;
    /* The spin under PARTITION_MAY_SLEEP (producers bump the doorbell, no syscall); ASLEEP
     * only for the futex wait (producers then wake it too: shmb_ctl_doorbell_ring). */
    if (spin_ns > 0 && shmb_spin_until_changed(doorbell, seen, spin_ns)) {
        r = SHMB_WAIT_CHANGED;
    } else {
        int64_t left_ms = timeout_ms;
        if (timeout_ms > 0) {
            left_ms = timeout_ms - (shmb_monotonic_ns() - start) / 1000000;
            if (left_ms < 1)
                left_ms = 1;
        }
        uint32_t state = SHMB_PARTITION_ASLEEP;
        if (doze_ms > 0 && (left_ms < 0 || doze_ms < left_ms)) {
            /* Dekker with shmb_ctl_hw_waiter_enter: DOZING first, then the count. A consumer
             * already waiting for the high watermark wants each commit appended: no doze. */
            shmb_u32_store_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET,
                                   SHMB_PARTITION_DOZING);
            if (shmb_u32_load_seq_cst(control + SHMB_CTL_HW_WAITERS_OFFSET) == 0) {
                state = SHMB_PARTITION_DOZING;
                left_ms = doze_ms;
            }
        }
        if (state == SHMB_PARTITION_ASLEEP)
            shmb_u32_store_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET,
                                   SHMB_PARTITION_ASLEEP);
        r = shmb_futex_wait(doorbell, seen, left_ms, 0);
        /* Producers bumped the doorbell without waking a dozer: their frames are the work. */
        if (state == SHMB_PARTITION_DOZING && r == SHMB_WAIT_TIMEOUT &&
            shmb_u32_load_seq_cst(doorbell) != seen)
            r = SHMB_WAIT_CHANGED;
    }
    shmb_u32_store_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET, SHMB_PARTITION_AWAKE);
    return r;
}
