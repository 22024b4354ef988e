"""The counters region: one per broker process, what that process has done, for `shmbroker
top` and the Prometheus endpoint. The single declaration of its bytes (nothing in C reads or
writes it by offset: the one C helper, ``_native.atomic_store_u64_many``, stores a run of
words the caller names). Design: docs/design/monitor.md ("Counters").

Name: ``shmb.<broker>.m.partition.<topic>.<partition>``, ``shmb.<broker>.m.coordinator``,
``shmb.<broker>.m.router`` (shmbroker/shm/names.py). Created 0600 by the supervisor before the
process first starts and kept across its restarts (a counter of a restarted process goes on
from where its predecessor left it); unlinked by the supervisor on a clean stop.

A local consumer, which reads the log without any broker process, keeps its own region,
``shmb.<broker>.m.consumer.<pid>.<n>`` (KIND_CONSUMER): created 0600 by the Consumer itself,
which is then both owner and writer, unlinked by its close(); one left by a consumer killed
with -9 is unlinked by the supervisor's periodic sweep (or the next start). After the table it
has CONSUMER_SLOTS_MAX partition slots (below).

All integers in the host's byte order; the region never leaves the host::

    offset  size  field                         writer
    ------  ----  ----------------------------  -------------------------------------------
         0    64  header line                   creator (the supervisor), once
                    0  u64 magic  "SHMBCNT1"
                    8  u32 layout_version
                   12  u32 header_bytes         (= COUNTERS_OFFSET)
                   16  u64 region_bytes
                   24  i32 owner_pid            (creator; stale cleanup looks at it)
                   28  u32 kind                 KIND_PARTITION / KIND_COORDINATOR / KIND_ROUTER
                   32  u64 owner_start_time     (/proc/<pid>/stat field 22)
                   40  u32 counters_count       u64 words from COUNTERS_OFFSET (= len(table))
                   44  u32 reserved
                   48  u64 created_ns           (CLOCK_REALTIME)
        64    64  writer line                   the process that writes the counters, on attach
                   64  i32 writer_pid
                   68  u32 writer_attaches      +1 each time a process takes the region over
                   72  u64 writer_start_time
                   80  u64 writer_attached_ns   (CLOCK_REALTIME)
       128   8*N  counters: u64 word i = table[i] of the region's kind (below); each has ONE
                  writer (the process of the writer line), stored with a relaxed atomic store
                  (untorn), loaded with a relaxed atomic load; no lock, no seqlock: every
                  counter stands alone, and two counters read together may be a round apart.

The tables are append-only within a layout version: a reader of version V finds every counter
of V at its index. Renaming, removing or moving one is a new version.

Consumer partition slots, from ``consumer_slots_offset()`` (64-byte aligned), SLOT_BYTES each::

    offset  size  field
         0     8  u64 topic_hash     topic_hash(name) (never 0); 0: the slot is free
         8     8  i64 partition
        16     8  u64 records_out    records this consumer handed out from the partition
        24     8  u64 bytes_out      bytes of record batches it read from the partition
        32    32  reserved

The coordinator's region ends with GROUP_WAKE_WORDS u32 **group wake words**, from
``group_wake_offset()`` (64-byte aligned)::

    offset  size  field                          writer
         0   4*W  u32 word[i]: +1 (and FUTEX_WAKE) each time the group the coordinator gave
                  slot i starts a rebalance                   the coordinator

A group consumer futex-waits on its group's word beside its partitions' hw_seq words, so it
learns of a rebalance at once instead of at its next heartbeat, and rejoins (docs/design/
groups.md, "Decision: a futex word tells members a rebalance began"). The coordinator gives
each group it holds in memory a slot of its own (at most GROUP_WAKE_WORDS groups at once; a
group beyond that has none and its members learn by heartbeat) and names it, with the word's
value, in every join answer; a slot freed by a forgotten group goes to the next new one, and
its word keeps counting up. They live here, not in a region of their own, because this is
the region the coordinator writes, the supervisor creates before the coordinator starts and
keeps across its restarts, and unlinks at a clean stop: what a wake word needs, with no new
name or cleanup.

A slot, once given to a partition, stays its own for the region's life (a partition revoked
and assigned again gets its old slot back), so every slot's counters only grow and no seqlock
is needed: the writer stores topic_hash and partition once, then the table's
``slots_used``; a reader loads ``slots_used`` first, then that many slots.
"""
from __future__ import annotations

from typing import NamedTuple

from .shm import Field


class Counter(NamedTuple):
    """One u64 word. ``metric``: its Prometheus name after ``shmbroker_<kind>_``; ``label``:
    an extra (name, value) label (counters that differ only by it share a metric name);
    ``type``: "counter" (only grows while the region exists) or "gauge"."""

    name: str
    type: str
    metric: str
    help: str
    label: tuple[str, str] | None = None
    #: Prometheus value = word * scale (base units: ms -> s, percent -> ratio).
    scale: float = 1


COUNTERS_MAGIC = int.from_bytes(b"SHMBCNT1", "little")
#: 2: the coordinator's region ends with its group wake words (below).
COUNTERS_LAYOUT_VERSION = 2
WRITER_OFFSET = 64
COUNTERS_OFFSET = 128

HEADER_FIELDS: tuple[Field, ...] = (
    Field("magic", 0, 8, "Q"),
    Field("layout_version", 8, 4, "I"),
    Field("header_bytes", 12, 4, "I"),
    Field("region_bytes", 16, 8, "Q"),
    Field("owner_pid", 24, 4, "i"),
    Field("kind", 28, 4, "I"),
    Field("owner_start_time", 32, 8, "Q"),
    Field("counters_count", 40, 4, "I"),
    Field("created_ns", 48, 8, "Q"),
    Field("writer_pid", 64, 4, "i"),
    Field("writer_attaches", 68, 4, "I"),
    Field("writer_start_time", 72, 8, "Q"),
    Field("writer_attached_ns", 80, 8, "Q"),
)
HEADER = {f.name: f.offset for f in HEADER_FIELDS}

KIND_PARTITION = 1
KIND_COORDINATOR = 2
KIND_ROUTER = 3
KIND_CONSUMER = 4
KIND_NAMES = {KIND_PARTITION: "partition", KIND_COORDINATOR: "coordinator",
              KIND_ROUTER: "router", KIND_CONSUMER: "consumer"}


def _c(name: str, help_: str, metric: str | None = None, label=None) -> Counter:
    return Counter(name, "counter", metric or f"{name}_total", help_, label)


def _g(name: str, help_: str) -> Counter:
    return Counter(name, "gauge", name, help_)


#: Partition process. The whole table is stored once per drain round (one C call); the first
#: seven move every round, the rest on events or when sampled (docs/design/monitor.md).
PARTITION_COUNTERS: tuple[Counter, ...] = (
    _c("drain_rounds", "Drain rounds that appended frames to the log."),
    _c("frames_in", "Ring frames appended to the log."),
    _c("batches_in", "Record batches appended to the log."),
    _c("records_in", "Records appended to the log."),
    _c("bytes_in", "Bytes of record batches appended to the log."),
    _g("high_watermark", "Next offset to be written (records below it are readable)."),
    _g("log_bytes", "Bytes of the partition's segment .log files."),
    Counter("ring_fill_percent", "gauge", "ring_fill_ratio",
            "Fullest ingress ring of the partition, as a fraction of its capacity (sampled).",
            None, 0.01),
    _g("producers", "Producer rings attached (producer processes connected)."),
    # -- on events
    _g("log_start_offset", "First offset still in the log (retention moves it)."),
    _g("segments", "Segments of the partition's log."),
    _c("fsyncs", "fsyncs of the active segment (flush policy, acks=all, close)."),
    Counter("last_fsync_time_ms", "gauge", "last_fsync_timestamp_seconds",
            "Wall clock of the last fsync (seconds since the epoch); 0: none since the "
            "region was created.", None, 0.001),
    _c("frames_rejected", "Frames rejected (a batch failed validation), completed with an "
                          "error.", "errors_total", ("kind", "bad_frame")),
    _c("rings_broken", "Ingress rings found corrupt and no longer read.", "errors_total",
       ("kind", "ring_corrupt")),
    _c("producers_gone", "Rings of producers that died, drained and reclaimed."),
    _c("native_rounds_declined", "Drain rounds the C round declined (the Python round ran)."),
    _c("segments_deleted", "Segments deleted by retention."),
    # -- decision 0005: offsets reserved at the producer's commit
    _c("offsets_filled", "Offsets filled with an empty batch: reserved by a producer that died "
                         "before its commit, or held by a refused frame."),
)
PARTITION = {c.name: i for i, c in enumerate(PARTITION_COUNTERS)}

#: Request types the coordinator counts one by one (coordinator/protocol.py); any other
#: type counts as "other". Append-only, like the tables.
COORDINATOR_REQUEST_TYPES = ("ping", "list_topics", "describe_topic", "create_topic",
                             "alter_partitions", "delete_topic", "join", "sync", "heartbeat",
                             "leave", "offset_commit", "offset_fetch", "groups_list",
                             "group_describe", "group_delete", "other")

#: Coordinator process: stored together once per pass of its loop (one C call).
COORDINATOR_COUNTERS: tuple[Counter, ...] = (
    _g("groups", "Consumer groups with members (live in the coordinator)."),
    _g("members", "Members of all groups."),
    _c("rebalances", "Join phases completed (a new generation of a group)."),
    _c("commits", "Offset commits accepted."),
    _c("offsets_committed", "Partition offsets written by accepted commits."),
    _c("error_replies", "Requests answered with an error.", "errors_total",
       ("kind", "error_reply")),
    _c("internal_errors", "Requests that hit a bug in the coordinator (answered with an "
                          "internal error).", "errors_total", ("kind", "internal")),
    *(_c(f"requests_{t}", f"Requests of type {t}.", "requests_total", ("type", t))
      for t in COORDINATOR_REQUEST_TYPES),
)
COORDINATOR = {c.name: i for i, c in enumerate(COORDINATOR_COUNTERS)}

#: Router process: stored together once per pass of its loop.
ROUTER_COUNTERS: tuple[Counter, ...] = (
    _c("forwarded", "Requests forwarded to the coordinator."),
    _c("refused", "Requests refused (malformed, too large, too many in flight, coordinator "
                  "busy).", "errors_total", ("kind", "refused")),
    _c("replies_undeliverable", "Replies that could not be sent (client gone or its queue "
                                "full).", "errors_total", ("kind", "reply_undeliverable")),
    _g("clients_waiting", "Clients with requests forwarded and not answered yet."),
    # -- cold reads (router/cold_read.py), appended in layout version 1
    _c("cold_grants", "Cold-read grants given in fetch replies (the bytes go by sendfile)."),
    _c("cold_reads", "Cold-read data connections that received every granted byte."),
    _c("cold_bytes", "Bytes sent by sendfile on cold-read data connections."),
    _c("cold_refused", "Cold-read data connections closed unserved (wrong, used or expired "
                       "token; none in time; too many connections).", "errors_total",
       ("kind", "cold_refused")),
    # -- remote data and authentication, appended in layout version 1
    _c("produce_requests", "Produce requests whose batch was handed to a partition's ring."),
    _c("produce_bytes", "Bytes of record batches received in produce requests."),
    _c("fetch_replies", "Fetch replies sent (hot: record bytes in the reply)."),
    _c("fetch_bytes", "Bytes of record batches sent in fetch replies (zero-copy frames)."),
    _c("auth_refused", "Clients refused by CURVE authentication (a key not allowed).",
       "errors_total", ("kind", "auth_refused")),
    _g("clients_connected", "TCP connections of clients open now (the socket monitor's "
                            "accepted minus disconnected)."),
)
ROUTER = {c.name: i for i, c in enumerate(ROUTER_COUNTERS)}

#: A local consumer (its own region; per-partition figures are in its slots).
CONSUMER_COUNTERS: tuple[Counter, ...] = (
    _c("polls", "poll()/poll_columnar() calls that returned records."),
    _c("records_out", "Records handed out (all partitions)."),
    _c("bytes_out", "Bytes of record batches read (all partitions)."),
    _g("partitions", "Partitions assigned now."),
    _g("slots_used", "Partition slots in use (see the layout)."),
    _c("records_unslotted", "Records of partitions beyond CONSUMER_SLOTS_MAX (counted in "
                            "records_out only)."),
)
CONSUMER = {c.name: i for i, c in enumerate(CONSUMER_COUNTERS)}

CONSUMER_SLOTS_MAX = 256
SLOT_BYTES = 64
SLOT_WORDS = 4  # the words a reader loads per slot (the reserved rest is not read)
SLOT = {"topic_hash": 0, "partition": 8, "records_out": 16, "bytes_out": 24}

#: HELP of a Prometheus metric that several counters share (by their label).
SHARED_HELP = {"errors_total": "Errors, by kind.", "requests_total": "Requests, by type."}

TABLES: dict[int, tuple[Counter, ...]] = {KIND_PARTITION: PARTITION_COUNTERS,
                                           KIND_COORDINATOR: COORDINATOR_COUNTERS,
                                           KIND_ROUTER: ROUTER_COUNTERS,
                                           KIND_CONSUMER: CONSUMER_COUNTERS}


def consumer_slots_offset() -> int:
    return (COUNTERS_OFFSET + 8 * len(CONSUMER_COUNTERS) + 63) // 64 * 64


def slot_offset(index: int) -> int:
    return consumer_slots_offset() + SLOT_BYTES * index


#: Group wake words in the coordinator's region (4 KiB): one slot per group held in memory;
#: groups beyond this many at once have none (their members learn by heartbeat).
GROUP_WAKE_WORDS = 1024


def group_wake_offset() -> int:
    return (COUNTERS_OFFSET + 8 * len(COORDINATOR_COUNTERS) + 63) // 64 * 64


def group_wake_word_offset(slot: int) -> int:
    assert 0 <= slot < GROUP_WAKE_WORDS, slot
    return group_wake_offset() + 4 * slot


def region_bytes(kind: int) -> int:
    if kind == KIND_CONSUMER:
        return slot_offset(CONSUMER_SLOTS_MAX)
    if kind == KIND_COORDINATOR:
        return group_wake_offset() + 4 * GROUP_WAKE_WORDS
    return COUNTERS_OFFSET + 8 * len(TABLES[kind])


def topic_hash(topic: str) -> int:
    """A slot's topic: 64 bits of BLAKE2b of the UTF-8 name (0 is kept for "free"). Readers
    hash the topics they know and match."""
    import hashlib

    value = int.from_bytes(hashlib.blake2b(topic.encode("utf-8", "surrogateescape"),
                                           digest_size=8).digest(), "little")
    return value or 1


def counter_offset(index: int) -> int:
    return COUNTERS_OFFSET + 8 * index


# --- self-checks ---------------------------------------------------------------------------

for _a, _b in zip(HEADER_FIELDS, HEADER_FIELDS[1:]):
    assert _a.offset + _a.size <= _b.offset, (_a, _b)
assert all(f.offset % f.size == 0 for f in HEADER_FIELDS)
assert HEADER_FIELDS[-1].offset + HEADER_FIELDS[-1].size <= COUNTERS_OFFSET
assert HEADER["writer_pid"] == WRITER_OFFSET and COUNTERS_OFFSET % 64 == 0
for _table in TABLES.values():
    assert len({c.name for c in _table}) == len(_table)
    assert all(c.type in ("counter", "gauge") for c in _table)
    assert all(c.type == "gauge" or c.metric.endswith("_total") for c in _table)
    assert all(c.metric in SHARED_HELP for c in _table if c.label is not None)
assert SLOT_WORDS * 8 <= SLOT_BYTES and max(SLOT.values()) < SLOT_WORDS * 8
assert consumer_slots_offset() >= COUNTERS_OFFSET + 8 * len(CONSUMER_COUNTERS)
assert group_wake_offset() >= COUNTERS_OFFSET + 8 * len(COORDINATOR_COUNTERS)
assert group_wake_offset() % 64 == 0
