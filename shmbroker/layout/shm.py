"""Shared-memory layouts: the partition control region, the ingress ring and its frames.

Every number here is the single source of truth: ``tools/gen_layout.py`` writes
``native/include/shmb/shm_layout.h`` from this module and ``tests/native/test_layout_drift.py``
fails when the header, the compiled extension and this declaration disagree. All integers are
in the host's byte order (little-endian on every machine we build for): these regions never
leave the host. Design and protocols: ``docs/design/shm.md``.

Partition control region (``shmb.<broker>.c.<topic>.<partition>``), one per partition. Created
by the broker side, outlives restarts of the partition process. Fields are grouped by their one
writer; every group (and every hot futex word) has its own 64-byte cache line::

    offset  size  field                         writer
    ------  ----  ----------------------------  -------------------------------------------
         0    64  header line                   creator, once, before anyone can attach
                    0  u64 magic  "SHMBCTL1"
                    8  u32 layout_version
                   12  u32 header_bytes         (= REGISTRY_OFFSET, where the slots start)
                   16  u64 region_bytes
                   24  i32 owner_pid             (creator; stale cleanup looks at it)
                   28  u32 registry_slots
                   32  u64 owner_start_time      (/proc/<pid>/stat field 22, pid reuse guard)
                   40  i32 partition
                   44  u32 reserved
                   48  u64 created_ns            (CLOCK_REALTIME, for humans)
        64    64  published state (seqlock)     partition process
                   64  u64 state_seq             odd while a publish is in progress
                   72  i64 high_watermark
                   80  i64 log_start_offset
                   88  i64 active_segment_base_offset
                   96  i64 active_segment_end_position (file bytes committed)
                  104  i32 partition_pid
                  108  i32 leader_epoch
                  112  u64 partition_start_time
       128    64  u32 hw_seq (futex)            partition process; +1 on every publish
       192    64  u32 doorbell (futex)          producers; +1 after committing frames
       256    64  u32 hw_waiters                consumers; count of those sleeping on hw_seq
       320    64  u32 partition_sleeping        partition process; PARTITION_MAY_SLEEP/ASLEEP/DOZING
       384    64  partition process, rarely written:
                  384  u32 partition_status      0 none yet, 1 running, 2 stopping (takes no
                                                 new frames), 3 stopped (its rings are drained)
       448    64  u32 registry_changes          producers; +1 after a slot becomes READY
       512    64  u64 next_offset               producers fetch_add a frame's offsets at its
                                                 commit (decision 0005); NEXT_OFFSET_UNSET
                                                 until the partition process sets it once from
                                                 its log end (a new region)
       576    64  u32 commit_seq (futex)        producers; +1 after every commit (decision
                                                 0005: a consumer reading rings sleeps on it)
       640    64  u32 commit_waiters            consumers; count of those sleeping on commit_seq
       704    64  what a consumer reading rings must know, partition process:
                  704  u32 ring_reads            1: consumers may read committed ring frames
                                                 (0 for LogAppendTime topics, whose timestamps
                                                 the partition sets)
                  712  i64 batch_bytes_max       the topic's max.message.bytes: a consumer
                                                 refuses exactly the frames the partition does
       768  64*N  producer registry, N = registry_slots, one 64-byte slot each:
                    0  i32 pid       claimed by CAS 0 -> pid; freed by CAS pid -> 0
                    4  u32 state     EMPTY / CLAIMED / READY / CLOSING
                    8  u64 start_time  of pid, pid reuse guard (0 = not written yet)
                   16  u32 generation  +1 on every claim; part of the ring's name
                   20  u32 reserved
                   24  u64 ring_bytes  capacity of the slot's ring

A frame's offsets are in its batches (the producer's commit set them), so a restarted partition
process needs no journal to tell which frames it had appended: a frame below the log end whose
batch is the log's batch at that offset was (docs/design/partition.md, "Duplicates after a
restart"). Layout version 2 had a round manifest here for that; 3 replaced it with
``next_offset``.

Ingress ring region (``shmb.<broker>.r.<topic>.<partition>.<slot>.<generation>``), one per
(producer process, partition); single producer, single consumer (the partition process)::

    offset  size  field                         writer
    ------  ----  ----------------------------  -------------------------------------------
         0    64  header line                   creator (the producer), once
                    0  u64 magic  "SHMBRNG1"
                    8  u32 layout_version
                   12  u32 header_bytes          (= DATA_OFFSET)
                   16  u64 region_bytes
                   24  u64 capacity              power of two, data bytes
                   32  i32 owner_pid
                   36  i32 partition
                   40  u64 owner_start_time
                   48  u32 slot                  registry slot in the control region
                   52  u32 generation
                   56  u64 created_ns
        64    64  producer line                 producer
                   64  u64 write_position        release-stored after frames are published
                   72  u64 next_sequence         sequence of the next frame
                   80  u64 completions_read      completions the producer has consumed
                   88  u32 space_waiting         producer threads that may sleep on space_seq
                   92  u32 ack_waiting           1 while the producer may sleep on ack_seq
                   96  u32 closed                1: the producer will write no more frames;
                                                 2: and it left the ring to the partition
                                                 undrained (RING_HANDED_OVER): the partition
                                                 unlinks it and frees the slot once drained
                  100  u32 completions_off       1: acks=0, completions may be overwritten
                  104  u32 fsync_required        1: acks="all", the log is fsynced before this
                                                 ring's frames are completed
                  112  u64 reserved_base         offsets this producer took from next_offset
                  120  u64 reserved_end            and has not committed yet: [base, end);
                                                 base = RESERVED_NONE when it holds none,
                                                 RESERVED_PENDING around its fetch_add (the
                                                 partition's hole check, decision 0005)
       128    64  consumer line                 partition process
                  128  u64 read_position         release-stored after frames are appended
                  136  u64 acked_sequence        last sequence with a completion (+1; 0 = none)
                  144  u64 completions_written
                  152  u32 space_seq (futex)     +1 when read_position moves and a producer waits
                  156  u32 ack_seq (futex)       +1 on every completion written
       192  32*C  completions, C = COMPLETIONS_MAX, entry k at (k % C):  partition process
                    0  u64 first_sequence
                    8  u64 last_sequence        frames first..last got consecutive offsets
                   16  i64 base_offset           offset of the first record of first_sequence
                   24  i32 error_code            0 = appended; else a shmbroker.errors code
                   28  u32 reserved
      4096  cap   data: frames, 8-byte aligned, positions are u64 that never wrap (index =
                  position & (capacity - 1))

Frame (``FRAME_HEADER_BYTES`` + payload, padded to ``FRAME_ALIGN``)::

    0  i32 length     header + payload, unpadded; stored LAST with a release store; 0 = not
                      committed; readers acquire-load it and stop at <= 0
    4  i32 type       DATA or PADDING (a PADDING frame fills the bytes up to the buffer's end)
    8  u64 sequence   DATA: the producer's frame sequence, consecutive from 0
   16  payload        one or more RecordBatch v2, as produced by records.encode_batch, whose
                      baseOffset fields the producer set at its commit (decision 0005):
                      the frame takes offsets [baseOffset of its first batch, + the sum of
                      lastOffsetDelta + 1 of its batches)

Offsets are assigned at the producer's commit (docs/decisions/0005): ``shmb_ring_write``
writes its frames, stores ``reserved_base = RESERVED_PENDING``, takes the frames' offsets with
one ``fetch_add`` on the control region's ``next_offset``, stores ``reserved_end`` then
``reserved_base``, patches each batch's baseOffset (outside the batch CRC), commits, and
stores ``reserved_base = RESERVED_NONE``. The partition appends frames in offset order across
rings; an offset below ``next_offset`` that no committed frame holds and no live producer
reserves belonged to a producer that died in that window, and is filled with an empty batch.
"""
from __future__ import annotations

import struct
from typing import NamedTuple


class Field(NamedTuple):
    name: str
    offset: int
    size: int
    struct_code: str  # struct format character, host byte order ("<" on our hosts)


CACHE_LINE_BYTES = 64

# --- partition control region --------------------------------------------------------------

CONTROL_MAGIC = int.from_bytes(b"SHMBCTL1", "little")
CONTROL_LAYOUT_VERSION = 4  # 3: next_offset (offsets at the producer's commit), no manifest;
#                             4: commit_seq, commit_waiters, ring_reads (consumers read rings)

CONTROL_FIELDS: tuple[Field, ...] = (
    # header line
    Field("magic", 0, 8, "Q"),
    Field("layout_version", 8, 4, "I"),
    Field("header_bytes", 12, 4, "I"),
    Field("region_bytes", 16, 8, "Q"),
    Field("owner_pid", 24, 4, "i"),
    Field("registry_slots", 28, 4, "I"),
    Field("owner_start_time", 32, 8, "Q"),
    Field("partition", 40, 4, "i"),
    Field("created_ns", 48, 8, "Q"),
    # published state (seqlock), written only by the partition process
    Field("state_seq", 64, 8, "Q"),
    Field("high_watermark", 72, 8, "q"),
    Field("log_start_offset", 80, 8, "q"),
    Field("active_segment_base_offset", 88, 8, "q"),
    Field("active_segment_end_position", 96, 8, "q"),
    Field("partition_pid", 104, 4, "i"),
    Field("leader_epoch", 108, 4, "i"),
    Field("partition_start_time", 112, 8, "Q"),
    # futex words and flags, each on its own line
    Field("hw_seq", 128, 4, "I"),
    Field("doorbell", 192, 4, "I"),
    Field("hw_waiters", 256, 4, "I"),
    Field("partition_sleeping", 320, 4, "I"),
    Field("partition_status", 384, 4, "I"),
    Field("registry_changes", 448, 4, "I"),
    Field("next_offset", 512, 8, "Q"),
    Field("commit_seq", 576, 4, "I"),
    Field("commit_waiters", 640, 4, "I"),
    Field("ring_reads", 704, 4, "I"),
    Field("batch_bytes_max", 712, 8, "q"),
)

#: Published state fields after state_seq, in order (one struct, read under the seqlock).
CONTROL_STATE_FIELDS = ("high_watermark", "log_start_offset", "active_segment_base_offset",
                        "active_segment_end_position", "partition_pid", "leader_epoch",
                        "partition_start_time")
CONTROL_STATE_STRUCT = struct.Struct("<qqqqiiQ")

CONTROL_REGISTRY_OFFSET = 768
#: next_offset of a region whose partition process has not set it yet (from its log end).
NEXT_OFFSET_UNSET = 1 << 63
SLOT_BYTES = 64

SLOT_FIELDS: tuple[Field, ...] = (
    Field("pid", 0, 4, "i"),
    Field("state", 4, 4, "I"),
    Field("start_time", 8, 8, "Q"),
    Field("generation", 16, 4, "I"),
    Field("ring_bytes", 24, 8, "Q"),
)

#: partition_status values (written by the partition process only).
PARTITION_STATUS_NONE = 0      # no partition process has run on this region yet
PARTITION_STATUS_RUNNING = 1   # draining rings
PARTITION_STATUS_STOPPING = 2  # SIGTERM: draining what is committed, then exiting
PARTITION_STATUS_STOPPED = 3   # exited cleanly; frames written now are never appended

#: ``partition_sleeping``: AWAKE (0) while the partition process works; MAY_SLEEP (1) from
#: the last look before a sleep and through its spin: a producer that commits then bumps the
#: doorbell (the spinner watches it) but makes no syscall; ASLEEP (2) from just before the
#: futex wait: the producer also wakes it. The stores are seq_cst and the producer bumps the
#: doorbell before it reads the flag again, so a producer that saw MAY_SLEEP bumped before
#: the ASLEEP store, and the futex's compare then sees the bump (docs/design/shm.md).
#: DOZING (3): a sleep of at most PARTITION_DOZE_MS right after a wake-up that found work
#: (frames are likely to keep coming). A producer's commit then bumps the doorbell without a
#: syscall; the partition takes what came when the doze ends (a doze the doorbell moved in
#: ends as a wake-up). Who waits for the partition wakes it anyway: a producer waiting for an
#: ack or for space (doorbell_ring_urgent), a consumer waiting for the high watermark
#: (hw_waiter_enter, which a partition about to doze also checks: with a waiter it sleeps
#: ASLEEP). docs/design/shm.md, "Dozing".
PARTITION_AWAKE = 0
PARTITION_MAY_SLEEP = 1
PARTITION_ASLEEP = 2
PARTITION_DOZING = 3

SLOT_EMPTY = 0     # pid == 0, free
SLOT_CLAIMED = 1   # pid claimed it; the ring may not exist yet
SLOT_READY = 2     # the ring exists and is initialised: the partition process may attach
SLOT_CLOSING = 3   # the producer is closing: drain what is committed, then free the slot

#: Slots in one control region (the producer processes one partition can have at once).
REGISTRY_SLOTS_MAX = 256


def control_region_bytes(registry_slots: int) -> int:
    return CONTROL_REGISTRY_OFFSET + registry_slots * SLOT_BYTES


# --- ingress ring region -------------------------------------------------------------------

RING_MAGIC = int.from_bytes(b"SHMBRNG1", "little")
RING_LAYOUT_VERSION = 2  # 2: reserved_base, reserved_end
#: reserved_base: the producer holds no offsets / is taking some (its fetch_add).
RESERVED_NONE = (1 << 64) - 1
RESERVED_PENDING = (1 << 64) - 2
#: ``closed``: the producer closed the ring before the partition took every committed frame
#: (a stopped broker). Committed frames are the log's (consumers may have read them from the
#: ring, decision 0005), so the ring is not removed with them: the partition drains it, then
#: unlinks it and frees its slot.
RING_CLOSED = 1
RING_HANDED_OVER = 2

RING_FIELDS: tuple[Field, ...] = (
    # header line
    Field("magic", 0, 8, "Q"),
    Field("layout_version", 8, 4, "I"),
    Field("header_bytes", 12, 4, "I"),
    Field("region_bytes", 16, 8, "Q"),
    Field("capacity", 24, 8, "Q"),
    Field("owner_pid", 32, 4, "i"),
    Field("partition", 36, 4, "i"),
    Field("owner_start_time", 40, 8, "Q"),
    Field("slot", 48, 4, "I"),
    Field("generation", 52, 4, "I"),
    Field("created_ns", 56, 8, "Q"),
    # producer line
    Field("write_position", 64, 8, "Q"),
    Field("next_sequence", 72, 8, "Q"),
    Field("completions_read", 80, 8, "Q"),
    Field("space_waiting", 88, 4, "I"),
    Field("ack_waiting", 92, 4, "I"),
    Field("closed", 96, 4, "I"),
    Field("completions_off", 100, 4, "I"),
    Field("fsync_required", 104, 4, "I"),
    Field("reserved_base", 112, 8, "Q"),
    Field("reserved_end", 120, 8, "Q"),
    # consumer line
    Field("read_position", 128, 8, "Q"),
    Field("acked_sequence", 136, 8, "Q"),
    Field("completions_written", 144, 8, "Q"),
    Field("space_seq", 152, 4, "I"),
    Field("ack_seq", 156, 4, "I"),
)

RING_COMPLETIONS_OFFSET = 192
COMPLETION_BYTES = 32
#: Completion entries kept in a ring; the partition process does not drain a ring whose
#: producer has COMPLETIONS_MAX completions it has not read yet (acks back-pressure), unless
#: the producer set completions_off (it does not want them: acks=0).
COMPLETIONS_MAX = 64

COMPLETION_FIELDS: tuple[Field, ...] = (
    Field("first_sequence", 0, 8, "Q"),
    Field("last_sequence", 8, 8, "Q"),
    Field("base_offset", 16, 8, "q"),
    Field("error_code", 24, 4, "i"),
)
COMPLETION_STRUCT = struct.Struct("<QQqi4x")

#: Frames start here (page aligned).
RING_DATA_OFFSET = 4096

FRAME_FIELDS: tuple[Field, ...] = (
    Field("length", 0, 4, "i"),
    Field("type", 4, 4, "i"),
    Field("sequence", 8, 8, "Q"),
)
FRAME_HEADER_BYTES = 16
FRAME_ALIGN = 8
FRAME_TYPE_DATA = 1
FRAME_TYPE_PADDING = 2
FRAME_HEADER_STRUCT = struct.Struct("<iiQ")

#: Ring capacities (data bytes) a region may declare. Power of two in between.
RING_CAPACITY_MIN = 4096
RING_CAPACITY_MAX = 1 << 30


def ring_region_bytes(capacity: int) -> int:
    return RING_DATA_OFFSET + capacity


def frame_bytes(payload_bytes: int) -> int:
    """Ring bytes one frame takes: header + payload, rounded up to FRAME_ALIGN."""
    return (FRAME_HEADER_BYTES + payload_bytes + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1)


def payload_bytes_max(capacity: int) -> int:
    """Largest payload a ring of ``capacity`` can always take, from any position.

    A frame may have to be preceded by a PADDING frame up to the end of the buffer, and the
    writer keeps FRAME_ALIGN bytes free after its tail (the zeroed length word of the next
    frame, see docs/design/shm.md), so a frame of more than capacity/2 bytes may never fit.
    """
    return capacity // 2 - FRAME_HEADER_BYTES


# --- results shared by the C core and the Python reference --------------------------------

RING_STATUS = {
    "OK": 0,         # done (a read may have found nothing: count 0)
    "FULL": 1,       # not every payload fit; the ones reported were written
    "TOO_LARGE": 2,  # a payload can never fit this ring (payload_bytes_max)
    "CORRUPT": 3,    # the ring's bytes break an invariant; message says which
    "OFFSETS_UNSET": 4,  # next_offset is not set yet (the partition process is starting):
                         # nothing was written; wait and write again
    "BAD_PAYLOAD": 5,    # a payload is shorter than a batch header, so its offsets cannot be
                         # set at the commit (decision 0005): nothing was written
}

#: shmb_ring_frame_at results (a consumer reading a ring, decision 0005 step 5).
FRAME_AT_STATUS = {
    "FOUND": 0,    # the committed frame holding the offset, copied and checked
    "NONE": 1,     # no committed frame of this ring holds it (or the ring is not readable)
    "TORN": 2,     # the partition released past the frame while it was read: the log has it
    "REFUSED": 3,  # the frame holding it breaks the partition's rule: the log will hold an
                   # empty batch there
    "LARGE": 4,    # the frame holding it is larger than RING_READ_COPY_BYTES_MAX: read it
                   # from the log (zero copy there; from a ring it would be a second copy)
}
#: Frames a consumer copies out of a ring at most (payload bytes). Measured reason: bench_ipc's
#: 64 KiB row, where the copy out of the ring came on top of the value's own copy on a
#: 2-vCPU host (perf/RESULTS.md, eleventh session); small frames are the latency case.
RING_READ_COPY_BYTES_MAX = 32 * 1024

#: futex_wait results.
WAIT_STATUS = {
    "WOKEN": 0,          # woken by a futex_wake (or spuriously): re-check the condition
    "TIMEOUT": 1,        # the timeout passed
    "CHANGED": 2,        # the word no longer held the expected value (no sleep)
    "INTERRUPTED": 3,    # a signal arrived (EINTR); Python checks for KeyboardInterrupt
}

# --- self-checks ---------------------------------------------------------------------------


def _check(fields: tuple[Field, ...], end: int) -> None:
    for a, b in zip(fields, fields[1:]):
        assert a.offset + a.size <= b.offset, (a, b)
    for f in fields:
        assert f.offset % f.size == 0, f  # naturally aligned, so atomics are legal
        assert struct.calcsize("<" + f.struct_code) == f.size, f
    assert fields[-1].offset + fields[-1].size <= end


_check(CONTROL_FIELDS, CONTROL_REGISTRY_OFFSET)
_check(SLOT_FIELDS, SLOT_BYTES)
_check(RING_FIELDS, RING_COMPLETIONS_OFFSET)
_check(COMPLETION_FIELDS, COMPLETION_BYTES)
_check(FRAME_FIELDS, FRAME_HEADER_BYTES)
assert RING_COMPLETIONS_OFFSET + COMPLETIONS_MAX * COMPLETION_BYTES <= RING_DATA_OFFSET
assert COMPLETION_STRUCT.size == COMPLETION_BYTES
assert FRAME_HEADER_STRUCT.size == FRAME_HEADER_BYTES
assert CONTROL_STATE_STRUCT.size == 48
assert COMPLETIONS_MAX & (COMPLETIONS_MAX - 1) == 0

CONTROL = {f.name: f.offset for f in CONTROL_FIELDS}
SLOT = {f.name: f.offset for f in SLOT_FIELDS}
RING = {f.name: f.offset for f in RING_FIELDS}
COMPLETION = {f.name: f.offset for f in COMPLETION_FIELDS}
FRAME = {f.name: f.offset for f in FRAME_FIELDS}

assert CONTROL["high_watermark"] == CONTROL["state_seq"] + 8
# Hot words written by different parties never share a cache line.
for _a, _b in (("hw_seq", "doorbell"), ("doorbell", "hw_waiters"),
               ("hw_waiters", "partition_sleeping"), ("state_seq", "hw_seq"),
               ("partition_sleeping", "partition_status"),
               ("partition_status", "registry_changes"), ("doorbell", "registry_changes"),
               ("registry_changes", "next_offset"), ("hw_seq", "next_offset"),
               ("next_offset", "commit_seq"), ("commit_seq", "commit_waiters"),
               ("commit_waiters", "ring_reads"), ("hw_seq", "commit_seq")):
    assert CONTROL[_a] // CACHE_LINE_BYTES != CONTROL[_b] // CACHE_LINE_BYTES
assert RING["write_position"] // 64 != RING["read_position"] // 64

CONSTANTS = {
    "CACHE_LINE_BYTES": CACHE_LINE_BYTES,
    "CONTROL_MAGIC": CONTROL_MAGIC,
    "CONTROL_LAYOUT_VERSION": CONTROL_LAYOUT_VERSION,
    "CONTROL_REGISTRY_OFFSET": CONTROL_REGISTRY_OFFSET,
    "NEXT_OFFSET_UNSET": NEXT_OFFSET_UNSET,
    "SLOT_BYTES": SLOT_BYTES,
    "PARTITION_STATUS_NONE": PARTITION_STATUS_NONE,
    "PARTITION_STATUS_RUNNING": PARTITION_STATUS_RUNNING,
    "PARTITION_STATUS_STOPPING": PARTITION_STATUS_STOPPING,
    "PARTITION_STATUS_STOPPED": PARTITION_STATUS_STOPPED,
    "PARTITION_AWAKE": PARTITION_AWAKE,
    "PARTITION_MAY_SLEEP": PARTITION_MAY_SLEEP,
    "PARTITION_ASLEEP": PARTITION_ASLEEP,
    "PARTITION_DOZING": PARTITION_DOZING,
    "SLOT_EMPTY": SLOT_EMPTY,
    "SLOT_CLAIMED": SLOT_CLAIMED,
    "SLOT_READY": SLOT_READY,
    "SLOT_CLOSING": SLOT_CLOSING,
    "REGISTRY_SLOTS_MAX": REGISTRY_SLOTS_MAX,
    "RING_MAGIC": RING_MAGIC,
    "RING_LAYOUT_VERSION": RING_LAYOUT_VERSION,
    "RESERVED_NONE": RESERVED_NONE,
    "RESERVED_PENDING": RESERVED_PENDING,
    "RING_CLOSED": RING_CLOSED,
    "RING_HANDED_OVER": RING_HANDED_OVER,
    "RING_COMPLETIONS_OFFSET": RING_COMPLETIONS_OFFSET,
    "COMPLETION_BYTES": COMPLETION_BYTES,
    "COMPLETIONS_MAX": COMPLETIONS_MAX,
    "RING_DATA_OFFSET": RING_DATA_OFFSET,
    "FRAME_HEADER_BYTES": FRAME_HEADER_BYTES,
    "FRAME_ALIGN": FRAME_ALIGN,
    "FRAME_TYPE_DATA": FRAME_TYPE_DATA,
    "FRAME_TYPE_PADDING": FRAME_TYPE_PADDING,
    "RING_CAPACITY_MIN": RING_CAPACITY_MIN,
    "RING_CAPACITY_MAX": RING_CAPACITY_MAX,
    **{f"RING_{k}": v for k, v in RING_STATUS.items()},
    **{f"WAIT_{k}": v for k, v in WAIT_STATUS.items()},
    **{f"FRAME_AT_{k}": v for k, v in FRAME_AT_STATUS.items()},
    "RING_READ_COPY_BYTES_MAX": RING_READ_COPY_BYTES_MAX,
}
