/* The ingress ring: one producer process, one consumer (the partition process), frames of
 * RecordBatch v2 payloads in a shared mapping. Layout: shm_layout.h (declared once in
 * shmbroker/layout/shm.py); protocol: docs/design/shm.md; pure-Python twin:
 * shmbroker/shm/ring_reference.py (same cases, same results, tests/native/).
 *
 * Plain C, no Python, no global state. Every function takes the whole region (header
 * included) and its length, re-reads the capacity and positions from the header and checks
 * them before using them: a corrupted or hostile header gives SHMB_RING_CORRUPT with a message,
 * never a read or write outside [region, region + region_len).
 *
 * Commit protocol (Aeron's): a writer fills frames, zeroes the length word at its new tail,
 * then publishes the FIRST frame's length with a release store (so a batch of frames becomes
 * visible at once) and finally release-stores write_position. Readers acquire-load a frame's
 * length and stop at <= 0.
 */
#ifndef SHMB_RING_H
#define SHMB_RING_H

#include <stddef.h>
#include <stdint.h>

#include "shmb/shm_layout.h"

#define SHMB_RING_MESSAGE_BYTES_MAX 160

typedef struct {
    uint64_t position; /* ring position (or header offset) at fault */
    char message[SHMB_RING_MESSAGE_BYTES_MAX];
} shmb_ring_error;

typedef struct {
    const void *data;
    size_t len;
} shmb_ring_payload;

/* One committed DATA frame, as found by shmb_ring_read. */
typedef struct {
    uint64_t payload_offset; /* from the start of the region */
    uint32_t payload_len;
    uint64_t sequence;
} shmb_ring_frame;

/* Checks magic, version, sizes, capacity and positions of a ring header. SHMB_RING_OK or
 * SHMB_RING_CORRUPT (err filled). On OK, *capacity_out (may be NULL) is the capacity. */
int shmb_ring_check(const uint8_t *region, size_t region_len, uint64_t *capacity_out,
                    shmb_ring_error *err);

/* Largest payload a ring of this capacity takes (capacity/2 - frame header). */
static inline uint64_t shmb_ring_payload_bytes_max(uint64_t capacity)
{
    return capacity / 2 - SHMB_FRAME_HEADER_BYTES;
}

static inline uint64_t shmb_ring_frame_bytes(uint64_t payload_len)
{
    return (SHMB_FRAME_HEADER_BYTES + payload_len + SHMB_FRAME_ALIGN - 1) &
           ~(uint64_t)(SHMB_FRAME_ALIGN - 1);
}

/* Producer: writes as many of payloads[0..n) as fit, in order, as DATA frames and publishes
 * them at once. *written = how many were written, *first_sequence = the first one's sequence.
 * With `control` (the partition's control region), the frames' offsets are taken from its
 * next_offset right before the commit and patched into their batches (decision 0005; see
 * reserve_offsets in ring.c): *first_offset = the first frame's base offset (-1 without
 * control), and each next frame's follows the previous one's shmb_frame_offsets.
 * Returns SHMB_RING_OK (all written), SHMB_RING_FULL (only *written of them; wait for space and
 * call again with the rest), SHMB_RING_TOO_LARGE (payloads[*written] can never fit; nothing
 * was written), SHMB_RING_BAD_PAYLOAD (with control: payloads[*written] is shorter than a
 * batch header; nothing was written), SHMB_RING_OFFSETS_UNSET (with control: next_offset is
 * not set yet; nothing was written) or SHMB_RING_CORRUPT. */
int shmb_ring_write(uint8_t *region, size_t region_len, uint8_t *control,
                    const shmb_ring_payload *payloads, size_t n, size_t *written,
                    uint64_t *first_sequence, int64_t *first_offset, shmb_ring_error *err);

/* Tests only: shmb_ring_write that kills its own process with SIGKILL right after the
 * frames' offsets are reserved and patched, before the commit (decision 0005's crash case
 * "producer between reserve and commit"). Returns only when it failed before that point. */
int shmb_ring_write_then_die(uint8_t *region, size_t region_len, uint8_t *control,
                             const shmb_ring_payload *payloads, size_t n);

/* Producer: whether a payload of payload_len bytes would fit now (0/1), or -1 if the header is
 * corrupt. */
int shmb_ring_fits(const uint8_t *region, size_t region_len, uint64_t payload_len);

/* Consumer: collects committed DATA frames from `position` (a frame boundary at or after
 * read_position, normally the end of the previous read) while their payloads total at most
 * max_bytes (with take_first, the first frame is taken even when it alone is larger: a read
 * always makes progress), and at most out_max frames. The first frame
 * must carry expected_sequence and each next one the following number. *next_position is
 * where the next read starts. Returns SHMB_RING_OK (with *count possibly 0) or
 * SHMB_RING_CORRUPT. Never writes. */
int shmb_ring_read(const uint8_t *region, size_t region_len, uint64_t position,
                   uint64_t expected_sequence, uint64_t max_bytes, int take_first,
                   shmb_ring_frame *out, size_t out_max, size_t *count,
                   uint64_t *next_position, shmb_ring_error *err);

/* What shmb_ring_frame_at found. */
typedef struct {
    int64_t base;       /* the frame's first offset */
    uint64_t span;      /* offsets it takes (shmb_frame_offsets) */
    uint64_t next_hint; /* where the next call (for a later offset) may start its walk */
    uint8_t *payload;   /* the copy (from alloc), FOUND only */
    size_t payload_len;
} shmb_ring_found;

/* A second reader of a ring, never writing (decision 0005 step 5: a consumer reads committed
 * frames before the partition appends them). Walks the committed frames from `hint` (a frame
 * boundary a previous call returned; read_position when it is behind read_position) for the
 * DATA frame whose offsets hold `offset`; copies its payload into alloc(ctx, len), then checks
 * that read_position did not pass the frame meanwhile (else the space may have been reused
 * and the copy torn: SHMB_FRAME_AT_TORN, and the log holds the frame), that the frame takes
 * offsets below the control region's next_offset and passes shmb_frame_ok with
 * batch_bytes_max and records_max (else SHMB_FRAME_AT_REFUSED: the partition refuses it too
 * and fills its offsets), and sets the copy's baseOffsets from its first one as the
 * partition's append does. A frame of more than SHMB_RING_READ_COPY_BYTES_MAX payload bytes
 * is not copied: SHMB_FRAME_AT_LARGE (read it from the log). SHMB_FRAME_AT_NONE: no committed frame of this ring holds offset
 * (ring of an acks="all" producer, bytes it cannot read, or alloc failed: the caller checks
 * its own alloc). Every loop is bounded by the ring's capacity. */
int shmb_ring_frame_at(const uint8_t *region, size_t region_len, const uint8_t *control,
                       int64_t offset, uint64_t hint, int64_t batch_bytes_max,
                       int64_t records_max, uint8_t *(*alloc)(void *ctx, size_t len), void *ctx,
                       shmb_ring_found *out);

/* Consumer: frees the ring up to `position` (release store of read_position), then wakes the
 * producer if it sleeps on space. Returns SHMB_RING_OK or SHMB_RING_CORRUPT (position not
 * 8-aligned, behind read_position or beyond write_position). */
int shmb_ring_release(uint8_t *region, size_t region_len, uint64_t position,
                      shmb_ring_error *err);

/* Producer: waits until a payload of payload_len fits, spinning up to spin_ns first, then
 * sleeping on space_seq (the consumer only makes the wake syscall when space_waiting, a count
 * of sleepers, is not 0).
 * Returns SHMB_WAIT_CHANGED (it fits now), SHMB_WAIT_WOKEN (space_seq moved but there is
 * still no room: the consumer nudged, see RingConsumer.poll), SHMB_WAIT_TIMEOUT,
 * SHMB_WAIT_INTERRUPTED, or -1 if the header is corrupt. timeout_ms < 0: no timeout. */
int shmb_ring_wait_space(uint8_t *region, size_t region_len, uint64_t payload_len,
                         int64_t timeout_ms, int64_t spin_ns);

/* Most rings one shmb_rings_wait_quiet call watches. */
#define SHMB_QUIET_RINGS_MAX 64

/* Producer's background sender: naps quiet_ns at a time (no futex: a sleeper on space_seq
 * would cost the partition process a FUTEX_WAKE per release) until one of the n rings is
 * idle (read_position == write_position) and was not written during the last nap, i.e. the
 * application thread, which writes on idle rings itself, has left records to the sender.
 * *which = that ring. Returns SHMB_WAIT_CHANGED, SHMB_WAIT_TIMEOUT, SHMB_WAIT_WOKEN when *poke
 * became non-zero (the Python side changed its plans: close, a ring dropped), or -1 when a
 * header is corrupt (*which names it) or the arguments are out of range. */
int shmb_rings_wait_quiet(uint8_t *const *regions, const size_t *region_lens, size_t n,
                          int64_t quiet_ns, int64_t timeout_ms, const volatile uint8_t *poke,
                          size_t *which);

/* Producer side of the partition's doorbell: after committing frames, wake the partition
 * process if (and only if) it sleeps (ASLEEP; a DOZING one takes the frames when its doze
 * ends, a bump tells it). `control` is the partition control region. */
void shmb_ctl_doorbell_ring(uint8_t *control);

/* As shmb_ctl_doorbell_ring, but a dozing partition is woken too: for a client about to wait
 * on the partition (an ack, ring space, the sender's idle ring). */
void shmb_ctl_doorbell_ring_urgent(uint8_t *control);

/* A consumer about to sleep on hw_seq: counted in hw_waiters (seq_cst), then a dozing
 * partition is woken (Dekker with shmb_drain_sleep, which raises DOZING before it reads
 * hw_waiters: either it sees the count and sleeps ASLEEP, or we see DOZING). Undo with
 * shmb_ctl_hw_waiter_leave. */
void shmb_ctl_hw_waiter_enter(uint8_t *control);
void shmb_ctl_hw_waiter_leave(uint8_t *control);

#endif
