/* One drain round of a partition process in one call: the common case of Drainer.round
 * (shmbroker/partition/drain.py). That Python round is the reference: it runs whenever this
 * one declines, and tests/integration/test_native_drain.py runs both on the same ring contents
 * and compares segment files, index files and completions byte for byte. Design:
 * docs/design/partition.md ("The C round"); why: docs/decisions/0004.
 *
 * Plain C, no Python, no global state; runs without the GIL. Layouts: shm_layout.h (rings,
 * completions, control region) and record_batch_layout.h (batches), both declared once in
 * shmbroker/layout/.
 *
 * Phases. Nothing in shared memory or on disk changes before phase 3, so a declined round
 * leaves everything exactly as it was for the Python round that follows:
 *
 *   1. collect (Drainer._collect): producers took their frames' offsets at their commit
 *      (decision 0005), so frames are taken in offset order across the rings: from the log
 *      end, the ring whose first unread frame starts at the next offset gives its run (its
 *      frames while each starts where the previous one ended, at most ring_round_bytes_max,
 *      the first always), then the next ring that continues, each ring once. A ring whose
 *      producer has COMPLETIONS_MAX completions unread is skipped (nudged in phase 3). The
 *      frames are copied into `scratch` in that order (the one copy, as the Python round's
 *      join: a producer cannot change bytes between validation and write); bases and spans
 *      are read from the copy. Declines BEHIND (a first frame below the log end: the Python
 *      round settles it) and HOLE (frames, but none continues the log: the Python round
 *      waits for a producer in its reservation or fills a dead one's offsets).
 *   2. check: each frame's bytes must be whole, valid batches (the C scan with CRC and
 *      records, batch_bytes_max, 1..batch_records_max records, no control batch); offsets
 *      are planned from the log end and every batch's own base offset must match; then the
 *      round declines if any taken ring wants fsync (acks=all), a roll is due (segment.ms,
 *      segment.bytes, a full index, int32 relative offsets), the flush policy would fsync,
 *      or the offsets would pass the limit. The leader epoch is patched into the scratch
 *      copy; index entries are planned with Kafka's rule (IndexRule in shmbroker/log/index.py).
 *   3. act, in drain.py's crash-safe order: nudge held-back producers; write the scratch
 *      bytes to the segment (O_APPEND fd: its end); publish the seqlocked state and wake
 *      consumers; complete each ring; release each ring.
 */
#ifndef SHMB_DRAIN_H
#define SHMB_DRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "shmb/ring.h"

/* Result of shmb_drain_round. */
#define SHMB_DRAIN_DONE 0          /* the round ran (it may have taken no frame) */
#define SHMB_DRAIN_DECLINED 1      /* nothing changed; out->decline says why */
#define SHMB_DRAIN_WRITE_FAILED 2  /* the write failed after append_round_base_offset was set:
                                      out->write_errno, out->truncated (file cut back) */

/* Why a round was declined: index = code. The glue exports the names, the Python side counts
 * them (Drainer.native_declined). */
#define SHMB_DRAIN_DECLINE_NAMES(X) \
    X(NONE)                         \
    X(RING_CORRUPT)                 \
    X(BAD_FRAME)                    \
    X(FSYNC_REQUIRED)               \
    X(ROLL_DUE)                     \
    X(FLUSH_DUE)                    \
    X(SCRATCH_FULL)                 \
    X(OFFSET_LIMIT)                 \
    X(STATE_ODD)                    \
    X(NO_MEMORY)                    \
    X(BEHIND)                       \
    X(HOLE)

#define SHMB_DRAIN_DECLINE_ENUM(name) SHMB_DRAIN_DECLINE_##name,
enum { SHMB_DRAIN_DECLINE_NAMES(SHMB_DRAIN_DECLINE_ENUM) SHMB_DRAIN_DECLINE_COUNT };
#undef SHMB_DRAIN_DECLINE_ENUM

/* Frames one ring may give one round (RingConsumer.poll's ring_scan takes as many). */
#define SHMB_DRAIN_RING_FRAMES_MAX 65536

/* One ring of the round. The caller fills region .. expected_sequence; the round fills the
 * rest (next_position == position and count == 0 when it took nothing from the ring). */
typedef struct {
    uint8_t *region;
    size_t region_len;
    uint64_t position;          /* RingConsumer.position */
    uint64_t expected_sequence; /* RingConsumer.expected_sequence (known: the caller checks) */
    /* out */
    uint64_t next_position;     /* where the next read starts (also past a lone padding) */
    uint32_t count;             /* frames taken, appended, completed and released */
    int held_back;              /* completions full: not read, producer nudged */
    int64_t base_offset;        /* offset of the first record of the ring's first run */
    int release_failed;         /* release found the header broken: release_err says why */
    shmb_ring_error release_err;
    /* private to the round */
    int head;                   /* a committed frame waits at next_position, not taken yet */
    int64_t head_base;          /* its base offset */
    size_t runs;                /* runs taken this round (one completion each) */
    size_t completions_free;    /* completions its producer has room for (SIZE_MAX: any) */
    uint64_t bytes;
} shmb_drain_ring;

/* The partition log's state and limits: PartitionLog.native_append_state. */
typedef struct {
    int fd;                          /* active segment's .log, opened O_APPEND */
    int64_t log_end_offset;          /* next offset */
    int64_t log_start_offset;
    int64_t segment_base_offset;
    uint64_t segment_size;           /* bytes in the active segment: where the write lands */
    int32_t leader_epoch;
    int32_t pid;                     /* published with the state, as ControlRegion.publish */
    uint64_t start_time;
    uint64_t round_bytes_max;        /* PARTITION_ROUND_BYTES_MAX */
    uint64_t ring_round_bytes_max;   /* PARTITION_RING_ROUND_BYTES_MAX */
    int64_t batch_bytes_max;         /* LogConfig.batch_bytes_max */
    int64_t batch_records_max;       /* BATCH_RECORDS_MAX */
    uint64_t segment_bytes;          /* LogConfig.segment_bytes */
    int64_t segment_ms;
    int64_t offset_entries_left;     /* OffsetIndex.entries_left */
    int64_t time_entries_left;
    int64_t first_batch_max_timestamp; /* of the active segment; -1: none or no timestamp */
    int64_t created_ms;              /* of the active segment */
    int64_t now_ms;                  /* the log's clock, read once for the round */
    int flush_due;                   /* flush.ms would fsync this append */
    int64_t flush_records_left;      /* flush.messages would fsync at this many; -1: no limit */
    int64_t last_offset_max;         /* OFFSET_MAX - 1 */
    int64_t interval_bytes;          /* the segment's IndexRule */
    int64_t bytes_since_entry;
    int64_t max_timestamp;
    int64_t offset_of_max_timestamp;
    int stop_after;                  /* tests only: SHMB_DRAIN_STOP_* (a kill -9 stand-in) */
} shmb_drain_log;

/* Tests only: return right after this step, as if the process were killed there. */
#define SHMB_DRAIN_STOP_NONE 0
#define SHMB_DRAIN_STOP_AFTER_WRITE 1
#define SHMB_DRAIN_STOP_AFTER_PUBLISH 2
#define SHMB_DRAIN_STOP_AFTER_COMPLETE 3

typedef struct {
    int64_t a, b; /* offset entry: (last offset, position); time entry: (timestamp, offset) */
} shmb_drain_entry;

typedef struct {
    int decline;              /* SHMB_DRAIN_DECLINE_* when declined */
    int write_errno;
    int truncated;            /* after a failed write: the file was cut back to its old size */
    uint64_t frames, records, batches, bytes;
    int64_t log_end_offset;   /* after the append */
    uint64_t segment_size;    /* after the append */
    int first_batch_set;      /* the segment was empty: first_batch_max_timestamp is new */
    int64_t first_batch_max_timestamp;
    int64_t bytes_since_entry, max_timestamp, offset_of_max_timestamp; /* IndexRule after */
    shmb_drain_entry *offset_entries; /* malloc'd; shmb_drain_result_free */
    size_t offset_entries_count;
    shmb_drain_entry *time_entries;   /* candidates for TimeIndex.maybe_append */
    size_t time_entries_count;
} shmb_drain_result;

/* Runs one round over rings[0..n) (see the phases above). `control` is the partition's
 * control region (control_len bytes); `scratch` (scratch_len bytes, private to the caller)
 * receives the copies.
 * Returns SHMB_DRAIN_DONE, SHMB_DRAIN_DECLINED or SHMB_DRAIN_WRITE_FAILED. A release that
 * finds a ring's header broken does not fail the round: that ring's release_failed is set
 * (its frames are appended and completed; the caller stops reading it, as _release does). */
int shmb_drain_round(shmb_drain_ring *rings, size_t n, uint8_t *control, size_t control_len,
                     uint8_t *scratch, size_t scratch_len, const shmb_drain_log *log,
                     shmb_drain_result *out);

void shmb_drain_result_free(shmb_drain_result *r);

/* ---- the loop's last look before it sleeps ---------------------------------------------- */

/* One ring as the partition process reads it: RingConsumer.buf, .position, .capacity. */
typedef struct {
    const uint8_t *region;
    size_t region_len;
    uint64_t position;
    uint64_t capacity;          /* as ring_check found it at attach (a power of two) */
} shmb_drain_look;

/* IngressRing.readable: a committed frame waits at `position` and the producer does not have
 * COMPLETIONS_MAX completions unread (a held-back ring is not work: its producer is nudged
 * and rings the doorbell when it has read them). 0 or 1; -1 when `position` lies outside the
 * region (a caller error). */
int shmb_drain_ring_readable(const shmb_drain_look *ring);

/* PartitionOwner.wait_for_work's first steps (docs/design/shm.md, wake-ups): load the doorbell,
 * raise partition_sleeping, then look once more for work: registry_changes moved from
 * `registry_seen` (-1: never scanned) or a ring is readable. Returns the doorbell value to
 * sleep on (>= 0) when there is none, -1 when there is work, -2 for a caller error (see
 * shmb_drain_ring_readable). partition_sleeping stays raised in every case: the caller clears
 * it after its sleep, or at once. */
int64_t shmb_drain_sleep_prepare(uint8_t *control, int64_t registry_seen,
                                 const shmb_drain_look *rings, size_t n);

/* The sleep itself, after shmb_drain_sleep_prepare returned `seen`: FUTEX_WAIT on the doorbell
 * (shmb_futex_wait: at most timeout_ms, spinning spin_ns first), then partition_sleeping is
 * lowered (ControlRegion.sleep_cancel) whatever woke it. Returns shmb_futex_wait's SHMB_WAIT_*.
 * doze_ms > 0 (below the time left): a doze (PARTITION_DOZING) of doze_ms instead, unless a
 * consumer waits for the high watermark; a doze that times out with the doorbell moved
 * returns SHMB_WAIT_CHANGED (producers committed meanwhile without waking it). */
int shmb_drain_sleep(uint8_t *control, uint32_t seen, int64_t timeout_ms, int64_t spin_ns,
                     int64_t doze_ms);

#endif
