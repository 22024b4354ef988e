/* The ingress ring (single producer, single consumer). Contract: shmb/ring.h; protocol and
 * invariants: docs/design/shm.md. The Python twin is shmbroker/shm/ring_reference.py. */
#include "shmb/ring.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "shmb/futex.h"
#include <signal.h>
#include <unistd.h>

#include "shmb/record_batch.h"
#include "shmb/shm_atomic.h"

#define ALIGN_MASK ((uint64_t)SHMB_FRAME_ALIGN - 1)
#define SPIN_CHECK_EVERY 64

static int fail(shmb_ring_error *err, uint64_t position, const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
        err->position = position;
    }
    return SHMB_RING_CORRUPT;
}

int shmb_ring_check(const uint8_t *region, size_t region_len, uint64_t *capacity_out,
                    shmb_ring_error *err)
{
    if (region_len < SHMB_RING_DATA_OFFSET)
        return fail(err, 0, "ring region of %zu bytes is smaller than its header (%d)",
                    region_len, SHMB_RING_DATA_OFFSET);
    uint64_t magic = shmb_u64_load_relaxed(region + SHMB_RING_MAGIC_OFFSET);
    if (magic != SHMB_RING_MAGIC)
        return fail(err, SHMB_RING_MAGIC_OFFSET, "bad ring magic 0x%016llx",
                    (unsigned long long)magic);
    uint32_t version = shmb_u32_load_relaxed(region + SHMB_RING_LAYOUT_VERSION_OFFSET);
    if (version != SHMB_RING_LAYOUT_VERSION)
        return fail(err, SHMB_RING_LAYOUT_VERSION_OFFSET,
                    "ring layout version %u, this build reads version %d", version,
                    SHMB_RING_LAYOUT_VERSION);
    uint32_t header_bytes = shmb_u32_load_relaxed(region + SHMB_RING_HEADER_BYTES_OFFSET);
    uint64_t capacity = shmb_u64_load_relaxed(region + SHMB_RING_CAPACITY_OFFSET);
    uint64_t region_bytes = shmb_u64_load_relaxed(region + SHMB_RING_REGION_BYTES_OFFSET);
    if (header_bytes != SHMB_RING_DATA_OFFSET)
        return fail(err, SHMB_RING_HEADER_BYTES_OFFSET, "ring header_bytes %u, expected %d",
                    header_bytes, SHMB_RING_DATA_OFFSET);
    if (capacity < SHMB_RING_CAPACITY_MIN || capacity > SHMB_RING_CAPACITY_MAX ||
        (capacity & (capacity - 1)) != 0)
        return fail(err, SHMB_RING_CAPACITY_OFFSET,
                    "ring capacity %llu is not a power of two in [%d, %d]",
                    (unsigned long long)capacity, SHMB_RING_CAPACITY_MIN,
                    SHMB_RING_CAPACITY_MAX);
    if (region_bytes != SHMB_RING_DATA_OFFSET + capacity || region_bytes > region_len)
        return fail(err, SHMB_RING_REGION_BYTES_OFFSET,
                    "ring region_bytes %llu does not match capacity %llu or the mapping (%zu)",
                    (unsigned long long)region_bytes, (unsigned long long)capacity, region_len);
    uint64_t read = shmb_u64_load_acquire(region + SHMB_RING_READ_POSITION_OFFSET);
    uint64_t write = shmb_u64_load_acquire(region + SHMB_RING_WRITE_POSITION_OFFSET);
    if (((read | write) & ALIGN_MASK) != 0 || write - read > capacity)
        return fail(err, SHMB_RING_WRITE_POSITION_OFFSET,
                    "ring positions out of range: read %llu, write %llu, capacity %llu",
                    (unsigned long long)read, (unsigned long long)write,
                    (unsigned long long)capacity);
    if (capacity_out != NULL)
        *capacity_out = capacity;
    return SHMB_RING_OK;
}

/* Bytes the next frame of payload_len takes at `tail`, padding to the buffer's end included. */
static uint64_t bytes_needed(uint64_t tail, uint64_t capacity, uint64_t payload_len)
{
    uint64_t fb = shmb_ring_frame_bytes(payload_len);
    uint64_t idx = tail & (capacity - 1);
    return idx + fb > capacity ? (capacity - idx) + fb : fb;
}

/* Whether `need` more bytes (plus the zeroed word after them) fit between tail and head. */
static inline int room_for(uint64_t tail, uint64_t head, uint64_t capacity, uint64_t need)
{
    return (tail - head) + need + SHMB_FRAME_ALIGN <= capacity;
}

typedef struct {
    uint8_t *data;
    uint64_t mask;
    uint64_t tail;      /* where this write started: its first frame is published last */
    uint32_t first_len; /* the length to publish at tail */
} write_cursor;

static void put_header(write_cursor *c, uint64_t pos, int32_t len, int32_t type, uint64_t seq)
{
    uint8_t *h = c->data + (pos & c->mask);
    shmb_u32_store_relaxed(h + SHMB_FRAME_TYPE_OFFSET, (uint32_t)type);
    if (type == SHMB_FRAME_TYPE_DATA)
        memcpy(h + SHMB_FRAME_SEQUENCE_OFFSET, &seq, sizeof seq);
    if (pos == c->tail)
        c->first_len = (uint32_t)len; /* published last, by the caller */
    else
        shmb_u32_store_relaxed(h + SHMB_FRAME_LENGTH_OFFSET, (uint32_t)len);
}

/* Decision 0005: the offsets of the n frames just written (not yet committed) are taken from
 * the control region's next_offset and patched into their batches. reserved_base says what
 * this producer holds until the commit, so that the partition process can tell a producer in
 * this window (wait for it) from one that died in it (fill its offsets): PENDING before the
 * fetch_add (the partition may not know our base yet), then [base, end). Every store is
 * seq_cst: the partition loads next_offset first and the rings' reservations after it, so a
 * fetch_add it counted is always seen here as PENDING or as its range. Returns the first
 * frame's base offset. */
static int64_t reserve_offsets(uint8_t *region, uint8_t *control, const write_cursor *c,
                               const shmb_ring_payload *payloads, size_t n)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += shmb_frame_offsets(payloads[i].data, payloads[i].len);
    shmb_u64_store_seq_cst(region + SHMB_RING_RESERVED_BASE_OFFSET, SHMB_RESERVED_PENDING);
    uint64_t base = shmb_u64_fetch_add(control + SHMB_CTL_NEXT_OFFSET_OFFSET, total);
    shmb_u64_store_seq_cst(region + SHMB_RING_RESERVED_END_OFFSET, base + total);
    shmb_u64_store_seq_cst(region + SHMB_RING_RESERVED_BASE_OFFSET, base);
    /* Patch the ring's copies: walk the frames from the write's start (padding skipped). */
    uint64_t pos = c->tail;
    int64_t next = (int64_t)base;
    for (size_t i = 0; i < n; i++) { /* bounded by the n frames (and a padding before each) */
        uint8_t *h = c->data + (pos & c->mask);
        if ((int32_t)shmb_u32_load_relaxed(h + SHMB_FRAME_TYPE_OFFSET) == SHMB_FRAME_TYPE_PADDING) {
            pos += (c->mask + 1) - (pos & c->mask);
            h = c->data;
        }
        shmb_frame_set_base(h + SHMB_FRAME_HEADER_BYTES, payloads[i].len, next);
        next += (int64_t)shmb_frame_offsets(payloads[i].data, payloads[i].len);
        pos += shmb_ring_frame_bytes(payloads[i].len);
    }
    return (int64_t)base;
}

/* Decision 0005 step 6: the commit itself wakes consumers that read rings. Dekker with
 * their sleep: the bump (a seq_cst RMW) comes before our load of commit_waiters; a consumer
 * counts itself in commit_waiters before its futex compares commit_seq. So either we see it
 * and wake it, or its compare sees the bump. No syscall while nobody sleeps. */
static void commit_wake(uint8_t *control)
{
    shmb_u32_fetch_add(control + SHMB_CTL_COMMIT_SEQ_OFFSET, 1);
    if (shmb_u32_load_seq_cst(control + SHMB_CTL_COMMIT_WAITERS_OFFSET))
        shmb_futex_wake((uint32_t *)(control + SHMB_CTL_COMMIT_SEQ_OFFSET), INT_MAX);
}

static int ring_write(uint8_t *region, size_t region_len, uint8_t *control,
                      const shmb_ring_payload *payloads, size_t n, size_t *written,
                      uint64_t *first_sequence, int64_t *first_offset, shmb_ring_error *err,
                      int kill_before_commit)
{
    uint64_t capacity;
    *written = 0;
    *first_sequence = 0;
    *first_offset = -1;
    if (shmb_ring_check(region, region_len, &capacity, err) != SHMB_RING_OK)
        return SHMB_RING_CORRUPT;
    uint64_t max = shmb_ring_payload_bytes_max(capacity);
    for (size_t i = 0; i < n; i++) {
        if (payloads[i].len > max) {
            *written = i;
            return SHMB_RING_TOO_LARGE;
        }
        if (control != NULL && payloads[i].len < SHMB_RB_HEADER_SIZE) {
            *written = i;
            return SHMB_RING_BAD_PAYLOAD;
        }
    }
    /* Only the partition process sets it, once, from UNSET: a value read here stays valid. */
    if (control != NULL &&
        (shmb_u64_load_acquire(control + SHMB_CTL_NEXT_OFFSET_OFFSET) & SHMB_NEXT_OFFSET_UNSET))
        return SHMB_RING_OFFSETS_UNSET;
    write_cursor c = {region + SHMB_RING_DATA_OFFSET, capacity - 1, 0, 0};
    c.tail = shmb_u64_load_relaxed(region + SHMB_RING_WRITE_POSITION_OFFSET); /* ours */
    uint64_t head = shmb_u64_load_acquire(region + SHMB_RING_READ_POSITION_OFFSET);
    uint64_t seq = shmb_u64_load_relaxed(region + SHMB_RING_NEXT_SEQUENCE_OFFSET);
    *first_sequence = seq;
    uint64_t pos = c.tail;
    size_t i = 0;
    for (; i < n; i++) {
        uint64_t fb = shmb_ring_frame_bytes(payloads[i].len);
        uint64_t idx = pos & c.mask;
        uint64_t pad = idx + fb > capacity ? capacity - idx : 0;
        if (!room_for(pos, head, capacity, pad + fb))
            break;
        if (pad) {
            put_header(&c, pos, (int32_t)pad, SHMB_FRAME_TYPE_PADDING, 0);
            pos += pad;
        }
        uint8_t *frame = c.data + (pos & c.mask);
        if (payloads[i].len)
            memcpy(frame + SHMB_FRAME_HEADER_BYTES, payloads[i].data, payloads[i].len);
        put_header(&c, pos, (int32_t)(SHMB_FRAME_HEADER_BYTES + payloads[i].len),
                   SHMB_FRAME_TYPE_DATA, seq);
        pos += fb;
        seq++;
    }
    if (i == 0)
        return SHMB_RING_FULL;
    if (control != NULL)
        *first_offset = reserve_offsets(region, control, &c, payloads, i);
    if (kill_before_commit)
        kill(getpid(), SIGKILL);
    /* The length word at the new tail must read 0 until the next write publishes it: readers
     * stop there. It is free space (room_for keeps FRAME_ALIGN bytes beyond every frame). */
    shmb_u64_store_relaxed(c.data + (pos & c.mask), 0);
    shmb_u64_store_relaxed(region + SHMB_RING_NEXT_SEQUENCE_OFFSET, seq);
    shmb_u64_store_release(region + SHMB_RING_WRITE_POSITION_OFFSET, pos);
    /* The commit: everything above becomes visible to a reader that acquires this length. */
    shmb_u32_store_release(c.data + (c.tail & c.mask) + SHMB_FRAME_LENGTH_OFFSET, c.first_len);
    if (control != NULL) { /* committed: the frames now hold their offsets themselves */
        shmb_u64_store_release(region + SHMB_RING_RESERVED_BASE_OFFSET, SHMB_RESERVED_NONE);
        commit_wake(control);
    }
    *written = i;
    return i == n ? SHMB_RING_OK : SHMB_RING_FULL;
}

int shmb_ring_fits(const uint8_t *region, size_t region_len, uint64_t payload_len)
{
    uint64_t capacity;
    if (shmb_ring_check(region, region_len, &capacity, NULL) != SHMB_RING_OK)
        return -1;
    uint64_t tail = shmb_u64_load_relaxed(region + SHMB_RING_WRITE_POSITION_OFFSET);
    uint64_t head = shmb_u64_load_acquire(region + SHMB_RING_READ_POSITION_OFFSET);
    if (payload_len > shmb_ring_payload_bytes_max(capacity))
        return 0;
    return room_for(tail, head, capacity, bytes_needed(tail, capacity, payload_len));
}

int shmb_ring_read(const uint8_t *region, size_t region_len, uint64_t position,
                   uint64_t expected_sequence, uint64_t max_bytes, int take_first,
                   shmb_ring_frame *out, size_t out_max, size_t *count,
                   uint64_t *next_position, shmb_ring_error *err)
{
    uint64_t capacity;
    *count = 0;
    *next_position = position;
    if (shmb_ring_check(region, region_len, &capacity, err) != SHMB_RING_OK)
        return SHMB_RING_CORRUPT;
    const uint8_t *data = region + SHMB_RING_DATA_OFFSET;
    uint64_t head = shmb_u64_load_acquire(region + SHMB_RING_READ_POSITION_OFFSET);
    if ((position & ALIGN_MASK) != 0 || position < head || position - head > capacity)
        return fail(err, position, "read position %llu outside [read_position %llu, +%llu]",
                    (unsigned long long)position, (unsigned long long)head,
                    (unsigned long long)capacity);
    uint64_t pos = position, bytes = 0;
    size_t k = 0;
    while (k < out_max && (pos - head) + SHMB_FRAME_ALIGN <= capacity) {
        uint64_t idx = pos & (capacity - 1);
        int32_t len = (int32_t)shmb_u32_load_acquire(data + idx + SHMB_FRAME_LENGTH_OFFSET);
        if (len == 0)
            break;
        int32_t type = (int32_t)shmb_u32_load_relaxed(data + idx + SHMB_FRAME_TYPE_OFFSET);
        if (len < 0)
            return fail(err, pos, "frame at %llu has length %d", (unsigned long long)pos, len);
        if (type == SHMB_FRAME_TYPE_PADDING) {
            if ((uint64_t)len != capacity - idx)
                return fail(err, pos, "padding frame at %llu has length %d, expected %llu",
                            (unsigned long long)pos, len, (unsigned long long)(capacity - idx));
            pos += (uint64_t)len;
            continue;
        }
        uint64_t fb = shmb_ring_frame_bytes((uint64_t)len - SHMB_FRAME_HEADER_BYTES);
        if (type != SHMB_FRAME_TYPE_DATA || len < SHMB_FRAME_HEADER_BYTES ||
            idx + fb > capacity || (pos - head) + fb > capacity)
            return fail(err, pos, "frame at %llu: type %d, length %d do not fit the ring",
                        (unsigned long long)pos, type, len);
        uint64_t seq;
        memcpy(&seq, data + idx + SHMB_FRAME_SEQUENCE_OFFSET, sizeof seq);
        if (seq != expected_sequence + k)
            return fail(err, pos, "frame at %llu has sequence %llu, expected %llu",
                        (unsigned long long)pos, (unsigned long long)seq,
                        (unsigned long long)(expected_sequence + k));
        uint64_t plen = (uint64_t)len - SHMB_FRAME_HEADER_BYTES;
        if (bytes + plen > max_bytes && !(k == 0 && take_first))
            break;
        out[k].payload_offset = SHMB_RING_DATA_OFFSET + idx + SHMB_FRAME_HEADER_BYTES;
        out[k].payload_len = (uint32_t)plen;
        out[k].sequence = seq;
        k++;
        bytes += plen;
        pos += fb;
    }
    *count = k;
    *next_position = pos;
    return SHMB_RING_OK;
}

int shmb_ring_release(uint8_t *region, size_t region_len, uint64_t position,
                      shmb_ring_error *err)
{
    uint64_t capacity;
    if (shmb_ring_check(region, region_len, &capacity, err) != SHMB_RING_OK)
        return SHMB_RING_CORRUPT;
    uint64_t head = shmb_u64_load_relaxed(region + SHMB_RING_READ_POSITION_OFFSET);
    uint64_t tail = shmb_u64_load_acquire(region + SHMB_RING_WRITE_POSITION_OFFSET);
    if ((position & ALIGN_MASK) != 0 || position < head || position > tail)
        return fail(err, position, "release to %llu outside [read %llu, write %llu]",
                    (unsigned long long)position, (unsigned long long)head,
                    (unsigned long long)tail);
    shmb_u64_store_release(region + SHMB_RING_READ_POSITION_OFFSET, position);
    /* Dekker with the producer's wait: our store above, then its flag; its flag, then our
     * position. One of us sees the other. */
    shmb_fence_seq_cst();
    if (shmb_u32_load_relaxed(region + SHMB_RING_SPACE_WAITING_OFFSET)) {
        shmb_u32_fetch_add(region + SHMB_RING_SPACE_SEQ_OFFSET, 1);
        shmb_futex_wake((uint32_t *)(region + SHMB_RING_SPACE_SEQ_OFFSET), INT_MAX);
    }
    return SHMB_RING_OK;
}

static int spin_for_space(uint8_t *region, size_t region_len, uint64_t payload_len,
                          int64_t deadline_ns)
{
    for (unsigned i = 1;; i++) {
        int r = shmb_ring_fits(region, region_len, payload_len);
        if (r != 0)
            return r;
        shmb_cpu_relax();
        if (i % SPIN_CHECK_EVERY == 0 && shmb_monotonic_ns() >= deadline_ns)
            return 0;
    }
}

int shmb_ring_wait_space(uint8_t *region, size_t region_len, uint64_t payload_len,
                         int64_t timeout_ms, int64_t spin_ns)
{
    int64_t start = shmb_monotonic_ns();
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : start + timeout_ms * 1000000;
    int r = spin_ns > 0 ? spin_for_space(region, region_len, payload_len,
                                         start + spin_ns < deadline ? start + spin_ns : deadline)
                        : shmb_ring_fits(region, region_len, payload_len);
    uint8_t *word = region + SHMB_RING_SPACE_SEQ_OFFSET;
    uint8_t *flag = region + SHMB_RING_SPACE_WAITING_OFFSET;
    for (;;) {
        if (r < 0)
            return -1;
        if (r > 0)
            return SHMB_WAIT_CHANGED;
        uint32_t seen = shmb_u32_load_acquire(word);
        /* A count, not a flag: the producer's application thread (full ring) and its
         * background sender (waiting for the ring to go idle) may sleep here at once. */
        shmb_u32_fetch_add(flag, 1);
        shmb_fence_seq_cst();
        r = shmb_ring_fits(region, region_len, payload_len);
        if (r != 0) {
            shmb_u32_fetch_add(flag, (uint32_t)-1);
            continue;
        }
        int64_t now = shmb_monotonic_ns();
        if (now >= deadline) {
            shmb_u32_fetch_add(flag, (uint32_t)-1);
            return SHMB_WAIT_TIMEOUT;
        }
        int64_t left_ms = deadline == INT64_MAX ? -1 : (deadline - now + 999999) / 1000000;
        int w = shmb_futex_wait((const uint32_t *)word, seen, left_ms, 0);
        shmb_u32_fetch_add(flag, (uint32_t)-1);
        if (w == SHMB_WAIT_INTERRUPTED)
            return SHMB_WAIT_INTERRUPTED;
        r = shmb_ring_fits(region, region_len, payload_len);
        /* Woken for another reason than space (the consumer nudges a producer whose
         * completions are all unread): let the caller act on it. */
        if (r == 0 && shmb_u32_load_acquire(word) != seen)
            return SHMB_WAIT_WOKEN;
    }
}

/* Sleeps ns (bounded by deadline); EINTR just ends the nap early: a signal for this process
 * is handled by Python's main thread, and the caller's loop re-checks everything anyway. */
static void nap_ns(int64_t ns, int64_t deadline)
{
    int64_t now = shmb_monotonic_ns();
    if (deadline - now < ns)
        ns = deadline - now;
    if (ns <= 0)
        return;
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    nanosleep(&ts, NULL);
}

int shmb_rings_wait_quiet(uint8_t *const *regions, const size_t *region_lens, size_t n,
                          int64_t quiet_ns, int64_t timeout_ms, const volatile uint8_t *poke,
                          size_t *which)
{
    uint64_t seen[SHMB_QUIET_RINGS_MAX];
    if (n == 0 || n > SHMB_QUIET_RINGS_MAX || quiet_ns <= 0)
        return -1;
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : shmb_monotonic_ns() + timeout_ms * 1000000;
    for (size_t i = 0; i < n; i++) {
        if (shmb_ring_check(regions[i], region_lens[i], NULL, NULL) != SHMB_RING_OK) {
            *which = i;
            return -1;
        }
        seen[i] = shmb_u64_load_acquire(regions[i] + SHMB_RING_WRITE_POSITION_OFFSET);
    }
    for (;;) { /* bounded by the deadline (or the poke) */
        nap_ns(quiet_ns, deadline);
        if (poke != NULL && *poke)
            return SHMB_WAIT_WOKEN;
        for (size_t i = 0; i < n; i++) {
            uint64_t tail = shmb_u64_load_acquire(regions[i] + SHMB_RING_WRITE_POSITION_OFFSET);
            uint64_t head = shmb_u64_load_acquire(regions[i] + SHMB_RING_READ_POSITION_OFFSET);
            if (tail == seen[i] && head == tail) {
                *which = i;
                return SHMB_WAIT_CHANGED;
            }
            seen[i] = tail;
        }
        if (shmb_monotonic_ns() >= deadline)
            return SHMB_WAIT_TIMEOUT;
    }
}

/* Dekker with the partition process: our frames were published (release) before this
 * fence; it sets partition_sleeping before looking at the rings. A spinning partition
 * (PARTITION_MAY_SLEEP) watches the doorbell word: the bump is enough. The wake only for one
 * in the futex: the flag is read again after the bump (seq_cst), so a partition that stored
 * ASLEEP (or DOZING) after that read finds the bump in the futex's compare. A DOZING one is
 * woken only for `urgent`: otherwise its doze ends within PARTITION_DOZE_MS and, the doorbell
 * having moved, counts as a wake-up (shmb_drain_sleep). */
static void doorbell(uint8_t *control, int urgent)
{
    shmb_fence_seq_cst();
    if (shmb_u32_load_relaxed(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET) !=
        SHMB_PARTITION_AWAKE) {
        shmb_u32_fetch_add(control + SHMB_CTL_DOORBELL_OFFSET, 1);
        uint32_t state = shmb_u32_load_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET);
        if (state == SHMB_PARTITION_ASLEEP || (urgent && state == SHMB_PARTITION_DOZING))
            shmb_futex_wake((uint32_t *)(control + SHMB_CTL_DOORBELL_OFFSET), INT_MAX);
    }
}

void shmb_ctl_doorbell_ring(uint8_t *control)
{
    doorbell(control, 0);
}

void shmb_ctl_doorbell_ring_urgent(uint8_t *control)
{
    doorbell(control, 1);
}

void shmb_ctl_hw_waiter_enter(uint8_t *control)
{
    shmb_u32_fetch_add(control + SHMB_CTL_HW_WAITERS_OFFSET, 1);
    if (shmb_u32_load_seq_cst(control + SHMB_CTL_PARTITION_SLEEPING_OFFSET) ==
        SHMB_PARTITION_DOZING) {
        shmb_u32_fetch_add(control + SHMB_CTL_DOORBELL_OFFSET, 1);
        shmb_futex_wake((uint32_t *)(control + SHMB_CTL_DOORBELL_OFFSET), INT_MAX);
    }
}

void shmb_ctl_hw_waiter_leave(uint8_t *control)
{
    shmb_u32_fetch_add(control + SHMB_CTL_HW_WAITERS_OFFSET, (uint32_t)-1);
}

int shmb_ring_write(uint8_t *region, size_t region_len, uint8_t *control,
                    const shmb_ring_payload *payloads, size_t n, size_t *written,
                    uint64_t *first_sequence, int64_t *first_offset, shmb_ring_error *err)
{
    return ring_write(region, region_len, control, payloads, n, written, first_sequence,
                      first_offset, err, 0);
}

int shmb_ring_write_then_die(uint8_t *region, size_t region_len, uint8_t *control,
                             const shmb_ring_payload *payloads, size_t n)
{
    size_t written;
    uint64_t first_sequence;
    int64_t first_offset;
    return ring_write(region, region_len, control, payloads, n, &written, &first_sequence,
                      &first_offset, NULL, 1);
}

int shmb_ring_frame_at(const uint8_t *region, size_t region_len, const uint8_t *control,
                       int64_t offset, uint64_t hint, int64_t batch_bytes_max,
                       int64_t records_max, uint8_t *(*alloc)(void *ctx, size_t len), void *ctx,
                       shmb_ring_found *out)
{
    uint64_t capacity;
    memset(out, 0, sizeof *out);
    out->base = -1;
    if (shmb_ring_check(region, region_len, &capacity, NULL) != SHMB_RING_OK ||
        shmb_u32_load_relaxed(region + SHMB_RING_FSYNC_REQUIRED_OFFSET))
        return SHMB_FRAME_AT_NONE; /* acks="all": its records are visible once fsynced */
    const uint8_t *data = region + SHMB_RING_DATA_OFFSET;
    const uint8_t *read_position = region + SHMB_RING_READ_POSITION_OFFSET;
    uint64_t mask = capacity - 1;
    uint64_t head = shmb_u64_load_acquire(read_position);
    uint64_t pos = hint;
    if ((hint & ALIGN_MASK) != 0 || hint < head || hint - head > capacity)
        pos = head;
    out->next_hint = pos;
    /* Bounded: every step moves pos forward by at least FRAME_ALIGN within one capacity. */
    while ((pos - head) + SHMB_FRAME_ALIGN <= capacity) {
        uint64_t idx = pos & mask;
        int32_t len = (int32_t)shmb_u32_load_acquire(data + idx + SHMB_FRAME_LENGTH_OFFSET);
        if (len == 0)
            return SHMB_FRAME_AT_NONE; /* the committed end */
        int32_t type = (int32_t)shmb_u32_load_relaxed(data + idx + SHMB_FRAME_TYPE_OFFSET);
        if (len < 0)
            return SHMB_FRAME_AT_NONE;
        if (type == SHMB_FRAME_TYPE_PADDING) {
            shmb_fence_acquire();
            if (shmb_u64_load_relaxed(read_position) > pos)
                return SHMB_FRAME_AT_TORN;
            if ((uint64_t)len != capacity - idx)
                return SHMB_FRAME_AT_NONE;
            pos += (uint64_t)len;
            continue;
        }
        uint64_t fb = shmb_ring_frame_bytes((uint64_t)len - SHMB_FRAME_HEADER_BYTES);
        if (type != SHMB_FRAME_TYPE_DATA || len < SHMB_FRAME_HEADER_BYTES + SHMB_RB_HEADER_SIZE ||
            idx + fb > capacity || (pos - head) + fb > capacity) {
            shmb_fence_acquire();
            return shmb_u64_load_relaxed(read_position) > pos ? SHMB_FRAME_AT_TORN
                                                               : SHMB_FRAME_AT_NONE;
        }
        const uint8_t *payload = data + idx + SHMB_FRAME_HEADER_BYTES;
        size_t plen = (size_t)len - SHMB_FRAME_HEADER_BYTES;
        int64_t base = shmb_frame_base(payload);
        uint64_t span = shmb_frame_offsets(payload, plen);
        /* Everything read from this frame so far is what the producer committed only if the
         * partition had not handed its space back when we read it. */
        shmb_fence_acquire();
        if (shmb_u64_load_relaxed(read_position) > pos)
            return SHMB_FRAME_AT_TORN;
        if (base > offset)
            return SHMB_FRAME_AT_NONE; /* this ring's frames are all later: not here */
        if ((uint64_t)(offset - base) >= span) {
            pos += fb;
            out->next_hint = pos;
            continue;
        }
        if (plen > SHMB_RING_READ_COPY_BYTES_MAX) {
            out->base = base;
            out->span = span;
            out->next_hint = pos + fb;
            return SHMB_FRAME_AT_LARGE;
        }
        uint8_t *copy = alloc(ctx, plen);
        if (copy == NULL)
            return SHMB_FRAME_AT_NONE;
        memcpy(copy, payload, plen);
        shmb_fence_acquire();
        if (shmb_u64_load_relaxed(read_position) > pos)
            return SHMB_FRAME_AT_TORN;
        out->base = base;
        out->span = span;
        out->next_hint = pos + fb;
        out->payload = copy;
        out->payload_len = plen;
        /* After the frame's commit was seen (the acquire of its length): every offset a
         * committed frame holds was taken from next_offset before, so it is below this. */
        uint64_t next_offset = shmb_u64_load_acquire(control + SHMB_CTL_NEXT_OFFSET_OFFSET);
        if (shmb_frame_base(copy) != base || shmb_frame_offsets(copy, plen) != span)
            return SHMB_FRAME_AT_TORN; /* cannot happen after the check above; cheap */
        if (base < 0 || (next_offset & SHMB_NEXT_OFFSET_UNSET) || (uint64_t)base >= next_offset ||
            !shmb_frame_ok(copy, plen, batch_bytes_max, records_max))
            return SHMB_FRAME_AT_REFUSED;
        shmb_frame_set_base(copy, plen, base);
        return SHMB_FRAME_AT_FOUND;
    }
    return SHMB_FRAME_AT_NONE;
}
