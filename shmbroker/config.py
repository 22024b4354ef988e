"""Every setting and every limit, declared once.

Names follow our style (units last: ``segment_ms``, ``batch_bytes_max``); each also accepts
Kafka's dotted topic-config name (``segment.bytes``) so that Kafka habits carry over.
A value outside its declared bounds is a :class:`~shmbroker.errors.ConfigError` at the
boundary, never a surprise deep inside the log.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DAY_MS = 24 * 3600 * 1000

# --- hard limits (not configurable) ----------------------------------------------------------

#: Largest batch any configuration may allow. Batches are mapped and handed out whole.
BATCH_BYTES_MAX_LIMIT = 64 * MiB
#: Positions in .index entries are signed 32-bit, so a segment must stay below 2 GiB.
SEGMENT_BYTES_MAX_LIMIT = 2 * GiB - 1
#: Small enough for tests that roll often; anything smaller is a configuration mistake.
SEGMENT_BYTES_MIN_LIMIT = 512
#: Records in one batch (Kafka stores the count as int32; we bound it far lower).
BATCH_RECORDS_MAX = 1 << 24
#: Rolled segments whose background fsync (shmbroker/log/flusher.py) may be queued at once; a
#: roll past it waits for the oldest. Each holds three duplicated file descriptors.
ROLL_FLUSHES_PENDING_MAX = 4
#: How long PartitionLog.close waits for the background fsyncs of rolled segments before it
#: gives up (LogError, no clean-shutdown marker: the next open validates those segments).
ROLL_FLUSH_CLOSE_WAIT_MS_MAX = 30_000

# --- topics and the broker's processes (docs/design/broker.md) -----------------------------------

#: Kafka's rule: topic names are at most 249 characters of [a-zA-Z0-9._-], and not "." or "..".
TOPIC_NAME_LENGTH_MAX = 249
#: Partitions of one topic. Each partition is an OS process, so this is far below Kafka's.
TOPIC_PARTITIONS_MAX = 1024
#: Partitions (so partition processes) of all topics of one broker together.
BROKER_PARTITIONS_MAX = 4096
#: Topics of one broker.
BROKER_TOPICS_MAX = 4096
#: A Unix socket path (sun_path) holds 107 bytes plus the NUL; ``<data_dir>/coordinator.sock``
#: must fit, so a data dir deeper than that is refused with a clear error.
UNIX_SOCKET_PATH_BYTES_MAX = 107
#: Largest coordinator request accepted; bigger ones get an INVALID_REQUEST reply.
COORDINATOR_REQUEST_BYTES_MAX = 64 * KiB
#: The router's hot/cold switch: a remote fetch from an offset more than this many bytes of
#: log behind the partition's end gets a cold-read grant (its bytes by os.sendfile on a data
#: connection) instead of the bytes in the reply, when the client takes grants. Measured in
#: perf/RESULTS.md ("Cold reads"); docs/design/router.md says why this value.
COLD_READ_HOT_WINDOW_BYTES_DEFAULT = 64 * MiB
#: Admin requests give up after this (Kafka's request.timeout.ms default).
ADMIN_REQUEST_TIMEOUT_MS = 30_000
#: While a client waits for a coordinator reply, it looks this often whether the broker is
#: still running and the coordinator was not restarted (a request in flight then is lost):
#: either ends the wait at once instead of at the timeout.
ADMIN_LIVENESS_CHECK_MS = 250


#: Where `shmbroker serve` starts the router unless told otherwise (``--listen none``: no
#: router). Loopback: without CURVE, only processes of this host can reach it.
ROUTER_LISTEN_DEFAULT = "tcp://127.0.0.1:7070"
_NOT_NUMBERS = ("listen", "metrics_listen", "metrics_allow_remote", "kafka_listen",
                "curve_server_secret_key_file", "curve_allowed_clients_dir")


@dataclass(frozen=True)
class BrokerConfig:
    """Timeouts and limits of the supervisor and its children; all waits are bounded by these."""

    #: A child that has not exited this long after SIGTERM gets SIGKILL.
    child_stop_timeout_ms: int = 5_000
    #: The first restart after a crash is immediate; each further crash of a child that lived
    #: less than ``restart_stable_ms`` doubles the wait, from this ...
    restart_backoff_min_ms: int = 200
    #: ... up to this.
    restart_backoff_max_ms: int = 10_000
    #: A child that ran this long before dying is restarted at once (its crash count resets).
    restart_stable_ms: int = 10_000
    #: `serve` waits this long for the processes of a broker that died (kill -9) to let go of
    #: the lock; a *live* owner is refused at once.
    lock_wait_ms: int = 10_000
    #: The coordinator answers a topic change once the supervisor has started / stopped the
    #: partition processes, or after this long (create/alter: answered anyway; delete: error).
    topic_change_ack_timeout_ms: int = 20_000
    #: How often a partition process applies retention (Kafka: log.retention.check.interval.ms).
    retention_check_interval_ms: int = 300_000
    #: Busy-wait of every partition process on its doorbell before it sleeps (0: sleep at once,
    #: ~0% idle CPU). For the lowest latency on a host with cores to spare: each partition
    #: process then burns up to this much CPU after every drain round and idle wake-up.
    partition_spin_us: int = 0
    #: How often the supervisor unlinks the counters regions of local consumers that died
    #: (kill -9) without unlinking their own.
    consumer_counters_sweep_ms: int = 2_000
    #: Where the router listens for remote clients (``tcp://127.0.0.1:7070``; port ``*``: any
    #: free one, see runtime.json); None: no router. `shmbroker serve` defaults to
    #: ROUTER_LISTEN_DEFAULT; this class to None, so a broker made in code binds no port
    #: unless asked.
    listen: str | None = None
    #: The router's CURVE secret key (a NAME.key_secret file, mode 0600); with
    #: ``curve_allowed_clients_dir``, clients must authenticate, and ``listen`` may be a
    #: non-loopback address. None: no authentication (loopback only).
    curve_server_secret_key_file: str | None = None
    #: The directory of the public keys (NAME.key files) of the clients allowed to connect.
    curve_allowed_clients_dir: str | None = None
    #: Where the Prometheus endpoint listens (``127.0.0.1:9644``; port 0: any free one, see
    #: runtime.json); None: no metrics process.
    metrics_listen: str | None = None
    #: Let metrics_listen be a non-loopback address (the endpoint has no authentication).
    metrics_allow_remote: bool = False
    #: Where the Kafka listener (issue 7) listens, ``HOST:PORT`` (port 0: any free one, see
    #: runtime.json); loopback only for now (no authentication); None: no kafka process.
    kafka_listen: str | None = None
    #: The router's hot/cold switch (COLD_READ_HOT_WINDOW_BYTES_DEFAULT).
    hot_window_bytes: int = COLD_READ_HOT_WINDOW_BYTES_DEFAULT

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name not in _NOT_NUMBERS:
                _check_range(field.name, getattr(self, field.name), 0, 1 << 40)
        if self.restart_backoff_min_ms > self.restart_backoff_max_ms:
            raise ConfigError("restart_backoff_min_ms must not exceed restart_backoff_max_ms")
        _check_range("partition_spin_us", self.partition_spin_us, 0, SPIN_NS_MAX // 1000)
        if (self.curve_server_secret_key_file is None) != (self.curve_allowed_clients_dir is None):
            raise ConfigError("CURVE needs both curve_server_secret_key_file (the router's "
                              "secret key) and curve_allowed_clients_dir (the clients' public "
                              "keys); one of them is missing")

    @property
    def curve(self) -> bool:
        """Whether the router authenticates its clients with CURVE."""
        return self.curve_server_secret_key_file is not None


# --- shared memory (shmbroker/shm; layouts in shmbroker/layout/shm.py) ------------------------

#: Data bytes of a producer's ingress ring (power of two). The largest payload a ring takes
#: is half of it (layout.shm.payload_bytes_max), so 8 MiB holds batches up to ~4 MiB.
RING_BYTES_DEFAULT = 8 * MiB
RING_BYTES_MIN = 4 * KiB
RING_BYTES_MAX = 1 * GiB
#: How long a producer blocks on a full ring before RingFullTimeoutError.
RING_SEND_TIMEOUT_MS_DEFAULT = 30_000
#: How long a written batch may wait for its acknowledgement before its futures fail with
#: RequestTimeoutError (Kafka's delivery.timeout.ms, same default): long enough to ride out a
#: restart of the partition process or of the whole broker, short enough that a flush() or
#: result() against a broker that never comes back ends.
PRODUCER_DELIVERY_TIMEOUT_MS_DEFAULT = 120_000
#: Optional busy-wait before a futex sleep (ns); 0 = sleep at once (idle CPU ~0%).
SPIN_NS_DEFAULT = 0
SPIN_NS_MAX = 10_000_000
#: Producer slots per partition control region (mirrors layout.shm.REGISTRY_SLOTS_MAX).
REGISTRY_SLOTS_DEFAULT = 256
#: Bounded retries of a seqlock read before the state is declared unavailable.
SEQLOCK_READ_TIMEOUT_MS_MAX = 1_000
#: Longest single doorbell sleep of a partition process: it wakes at least this often to look
#: for dead producers even when nobody rings. Their committed frames are drained by the
#: ordinary rounds; this only bounds how long a dead producer's ring and registry slot linger
#: (and a frame whose producer died between its commit and the doorbell). 1 s, not 200 ms:
#: each wake-up costs ~0.4 ms of CPU on a slow 2-vCPU VM, and the idle target is < 1% of a
#: core for the whole broker with 8 idle clients (perf/RESULTS.md).
DOORBELL_SLEEP_MS_MAX = 1_000

# --- the partition process's data plane (docs/design/partition.md) ----------------------------

#: Payload bytes one drain round takes from all rings together (then: one append, completions,
#: releases, one publish). Bounds the latency one round adds and what a crash re-reads.
PARTITION_ROUND_BYTES_MAX = 4 * MiB
#: Payload bytes one drain round takes from one ring (fairness between producers). At least a
#: thirty-second of a ring, so a producer never has COMPLETIONS_MAX unread completions while
#: its ring still holds frames it wrote before its last send (docs/design/shm.md).
PARTITION_RING_ROUND_BYTES_MAX = 1 * MiB
#: Whether a drain round first tries the C round (one call: collect, validate, write,
#: publish, complete, release; native/include/shmb/drain.h), which declines to the Python
#: round for anything unusual (docs/decisions/0004, step 1). False: the Python round only.
PARTITION_NATIVE_ROUND = True
#: Partition processes run under SCHED_BATCH (sched(7)): woken by a producer's doorbell, one
#: does not preempt the client that rang it (the woken task would otherwise often get the
#: producer's own CPU at once, inside its send, on a host with few cores); it runs when that
#: client sleeps or another core is free. Same share of CPU as before (nice 0).
PARTITION_SCHED_BATCH = True
#: After a wake-up that found work, a partition process dozes at most this long instead of
#: sleeping until woken: producers' commits meanwhile bump its doorbell without a syscall,
#: and it takes them all when the doze ends (one round for many sparse frames, and no
#: wake-up on the producer's critical path; docs/design/shm.md, "Dozing"). Who waits on it
#: wakes it anyway (an ack, ring space, a consumer of the log waiting for the high
#: watermark). A doze that ends with nothing new is followed by a sleep. 0: never doze.
#: 4, not 1, since the fifteenth session: a doze's round runs on a vCPU a ping-pong client
#: wants (and takes the frames a woken consumer was about to read from the ring, sending it
#: to the log): bench_ipc --only shmbroker,pipe, alternating, round-trip p99 blocking
#: 196/181/171/195/192 -> 167/149/222/194/162 us (5 pairs), spin 87/79/83/84 -> 70/65/69/65
#: us (4 pairs); throughput rows and idle within noise (perf/RESULTS.md). 8: blocking p99
#: mixed (3 pairs), not taken.
#: A spinning ping-pong still gets a round every ~512 frames (ACC_DOZE_WAKE_FRAMES).
PARTITION_DOZE_MS = 4
#: After a woken round, one C call may go on dozing and running rounds while each appended
#: and left nothing for Python (drain_loop: at most this many rounds, for at most
#: PARTITION_LOOP_BUDGET_MS), then Python settles their sum in one pass
#: (docs/design/partition.md, "What a round costs"). 1: one round per call. On since the
#: fourteenth session, once sparse sends stopped waking partitions every 16 frames and the
#: loop stopped sleeping plainly between rounds: bench_ipc --cases rtt-spin,rtt-block, off
#: against 64 rounds / 50 ms, alternating, 5 pairs: spin p99 125-187 -> 63-115 us and
#: blocking p99 276-464 -> 178-353 us (every pair). A Python round and its settling stall a
#: spinning client once a call, so fewer, longer calls (32 / 20 ms and 32 / 5 ms had a
#: higher spin p99.9 than 64 / 50 ms in one sitting).
PARTITION_LOOP_ROUNDS_MAX = 64
PARTITION_LOOP_BUDGET_MS = 50
#: How long a stopping partition process keeps draining rings before it exits anyway (below
#: BrokerConfig.child_stop_timeout_ms, after which the supervisor sends SIGKILL).
PARTITION_STOP_DRAIN_MS_MAX = 3_000

# --- producers (shmbroker/client/producer.py) -------------------------------------------------

#: A batch is written once it holds this many bytes of values and keys (Kafka: batch.size is
#: 16 KiB; a larger default suits shared memory, where a batch costs no network round trip).
PRODUCER_BATCH_BYTES_DEFAULT = 256 * KiB
#: Records in one batch the producer builds (a batch is written when either limit is reached).
PRODUCER_BATCH_RECORDS_MAX = 1 << 16
#: Longest a producer lets records wait in its accumulator (Kafka: linger.ms).
PRODUCER_LINGER_MS_MAX = 60_000
#: Frames a producer may have unacknowledged in one ring before a new batch waits for the
#: ring to go idle (Kafka: max.in.flight.requests.per.connection, 5 there: a request in
#: flight costs a connection's pipeline; a frame here costs ring bytes only: the partition
#: acknowledges all the frames of a round in one completion). 1: a batch is written only
#: when the partition has taken everything before it. 256, not 32: a dozing partition
#: (PARTITION_DOZE_MS) acknowledges once a doze, and a spinning ping-pong sends ~100 frames
#: a millisecond: at 32 its sends were held for the partition's next round (~0.65 ms round
#: trips, 0.1-1% of them) and it was woken urgently every 16 frames (perf/RESULTS.md,
#: fourteenth session). 1024 since the sixteenth session (the urgent wake at half of it, 512
#: frames): each such wake's round preempts a spinning client on two vCPUs, and once a send
#: resolves at most _REAP_SOME_BATCHES acknowledged batches a bigger round no longer costs one
#: send more: bench_pingpong_tail --spin-us 1000, alternating, 3 pairs, spin p99 67/56/45 ->
#: 31/40/23 us (perf/RESULTS.md).
PRODUCER_MAX_IN_FLIGHT_DEFAULT = 1024
PRODUCER_MAX_IN_FLIGHT_MAX = 1024
#: A batch's first record is written at once, beside frames still in flight, when the record
#: before it was appended at least this long earlier (a sparse send: waiting for the ring to
#: go idle would add the partition's round to its latency and batch nothing). Sends closer
#: together than this batch behind the frame in flight, as before (a dense stream sends
#: every 0.3-0.5 us; a spinning ping-pong every 5-8 us, which 5 us here split: its held
#: sends waited for the partition's round, fourteenth session; 1 us since the seventeenth,
#: when the C poll brought a ping-pong's sends ~2-3 us apart and 2 us held some of them:
#: ~0.15% of its round trips at 0.5-1 ms).
PRODUCER_SPARSE_GAP_US = 1
#: Per-(producer, partition) ring for producers (data bytes, power of two).
PRODUCER_RING_BYTES_DEFAULT = 4 * MiB
#: How long close() waits for the partition process to take what is still in the rings.
PRODUCER_CLOSE_DRAIN_MS_MAX = 5_000
#: A producer re-reads a topic's partition count (one stat of topics.json) this often, so
#: partitions added later get keyed and keyless records (Kafka: metadata.max.age.ms, 5 min;
#: on one host the check costs a stat, not a request).
PRODUCER_METADATA_MAX_AGE_MS = 1_000
#: How long a client waits for a partition of an existing topic to be served while the broker
#: runs (a topic created a moment ago: the supervisor is still starting its partition
#: process; Kafka's producer waits for metadata likewise, max.block.ms). A stopped broker is
#: reported at once.
PARTITION_SERVE_WAIT_MS = 10_000
#: Nap between looks for that partition's control region.
PARTITION_SERVE_POLL_MS = 5
#: The producer's background sender takes over a ring's pending records once the ring is
#: idle and was not written for this long (the application, which writes on idle rings
#: itself, has stopped sending there). It checks that often, without the GIL.
PRODUCER_SENDER_QUIET_US = 500
#: Longest single wait of the sender before it looks at everything again (the partition's
#: status, new accumulators); close() and a dropped ring end the wait at once.
PRODUCER_SENDER_WAIT_MS_MAX = 1_000
#: A linger_ms wait of the sender is slept in slices this long (close() need not wait).
PRODUCER_SENDER_TIMER_SLICE_MS = 20
#: A background sender with nothing to do for this long ends; the next send that leaves
#: records behind starts a new one (an idle producer has no thread).
PRODUCER_SENDER_IDLE_MS_MAX = 1_000

# --- consumer groups (shmbroker/coordinator/group.py; docs/design/groups.md) -------------------

#: A member not heard from (join, sync, heartbeat, commit) for its session timeout is removed
#: and the group rebalances (Kafka: session.timeout.ms, default 45 s). A dynamic member whose
#: process dies is removed at once (pid), so this waits out only hung members and the restart
#: of a static member.
GROUP_SESSION_TIMEOUT_MS_DEFAULT = 45_000
#: Kafka's broker refuses less than 6 s (group.min.session.timeout.ms) because heartbeats cross
#: a network; on one host nothing is in the way, so tests and latency-minded users may go low.
GROUP_SESSION_TIMEOUT_MS_MIN = 100
#: Kafka: group.max.session.timeout.ms (30 min).
GROUP_SESSION_TIMEOUT_MS_MAX = 30 * 60 * 1000
#: How long a rebalance waits for every member to rejoin, and then to sync, before it goes on
#: without the late ones (Kafka: the member's max.poll.interval.ms, default 5 min).
GROUP_REBALANCE_TIMEOUT_MS_DEFAULT = 300_000
GROUP_REBALANCE_TIMEOUT_MS_MIN = 1
GROUP_REBALANCE_TIMEOUT_MS_MAX = 60 * 60 * 1000
#: The first rebalance of an empty group waits this long for more members (Kafka:
#: group.initial.rebalance.delay.ms, 3 s). 0 here: a rebalance costs milliseconds on one host.
GROUP_INITIAL_REBALANCE_DELAY_MS_DEFAULT = 0
GROUP_INITIAL_REBALANCE_DELAY_MS_MAX = 60_000
#: Members of one group (Kafka: group.max.size, unbounded by default). Each member is a client
#: process on this host, and an assignment costs O(partitions x members) at worst.
GROUP_MEMBERS_MAX = 1024
#: Group ids, group instance ids and client ids: Kafka's topic-name length limit, reused.
GROUP_NAME_LENGTH_MAX = 249
#: Assignor names one member may offer (Kafka: partition.assignment.strategy).
GROUP_PROTOCOLS_MAX = 8
#: The metadata string stored with a committed offset, in UTF-8 bytes (Kafka:
#: offset.metadata.max.bytes, 4096).
GROUP_OFFSET_METADATA_BYTES_MAX = 4096
#: Partitions in one offset commit: one batch of the offsets log, written all or nothing. With
#: the name and metadata limits above a batch stays below BATCH_BYTES_MAX_LIMIT (checked in
#: shmbroker/coordinator/offsets.py).
GROUP_OFFSET_COMMIT_PARTITIONS_MAX = BROKER_PARTITIONS_MAX
#: The offsets log is compacted when its records reach this many times the live keys (Kafka:
#: min.cleanable.dirty.ratio 0.5, i.e. at least half of it is superseded) ...
GROUP_OFFSETS_COMPACTION_RATIO_DEFAULT = 2
GROUP_OFFSETS_COMPACTION_RATIO_MIN = 2
GROUP_OFFSETS_COMPACTION_RATIO_MAX = 1 << 20
#: ... and holds at least this many records (a small log loads fast, so not worth a rewrite).
GROUP_OFFSETS_COMPACTION_RECORDS_MIN_DEFAULT = 10_000
#: Records per batch when compaction rewrites the live offsets.
GROUP_OFFSETS_COMPACTION_BATCH_RECORDS_DEFAULT = 1024
#: Segment size of the offsets log (Kafka: offsets.topic.segment.bytes, 100 MiB).
GROUP_OFFSETS_SEGMENT_BYTES_DEFAULT = 100 * MiB
#: Undecodable records of the offsets log get one warning each, up to this many per load;
#: the rest are only counted (a newer version's log could hold millions).
GROUP_OFFSETS_LOAD_WARNINGS_MAX = 10
#: A group consumer heartbeats this often, from ``poll()`` (Kafka: heartbeat.interval.ms, 3 s).
#: A local member learns that its group rebalances from the group's wake word at once; for a
#: remote one (no shared memory) a heartbeat is how, so this bounds how long a rebalance waits
#: for it. Each heartbeat costs a member and the coordinator a wake-up (~0.1 ms of CPU each
#: on a 2-vCPU VM): 32 members at 20 ms kept most of such a machine busy (perf/RESULTS.md).
GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT = 100
GROUP_HEARTBEAT_INTERVAL_MS_MIN = 1
#: A group consumer commits its positions this often, from ``poll()`` (Kafka:
#: auto.commit.interval.ms, 5 s).
GROUP_AUTO_COMMIT_INTERVAL_MS_DEFAULT = 5_000
GROUP_AUTO_COMMIT_INTERVAL_MS_MIN = 1
#: Join attempts in one rejoin before giving up with the last error (each answered at once, or
#: held by the coordinator for at most the rebalance timeout).
GROUP_JOIN_ATTEMPTS_MAX = 20
#: Extra time a client waits for a held join beyond its rebalance timeout.
GROUP_JOIN_REPLY_MARGIN_MS = 5_000
#: How often the coordinator drops the pid watches of members gone from their group, and,
#: only for a member whose pidfd could not be opened (no pidfd_open, fds exhausted), checks
#: that its pid still runs (psutil, /proc reads): such a kill -9'd member is noticed within
#: this. Others are noticed at once through their pidfd (docs/design/groups.md).
GROUP_PID_CHECK_INTERVAL_MS = 100
#: Groups the coordinator keeps in memory at once (a group with members or a rebalance in
#: progress; empty ones are dropped, their committed offsets stay in the offsets store).
COORDINATOR_GROUPS_MAX = 10_000

#: Where `make run` and `shmbroker` keep data when neither --data-dir nor the environment says.
DATA_DIR_ENV = "SHMBROKER_DATA_DIR"


def default_data_dir() -> str:
    """``$SHMBROKER_DATA_DIR``, else ``$XDG_DATA_HOME/shmbroker`` (``~/.local/share/shmbroker``)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "shmbroker")


@dataclass(frozen=True)
class LogConfig:
    """Per-topic (and so per-partition-log) settings. Kafka's defaults unless noted."""

    #: Roll to a new segment when the active one would exceed this size (Kafka: segment.bytes).
    segment_bytes: int = 1 * GiB
    #: Roll when the active segment's first batch is older than this (Kafka: segment.ms).
    segment_ms: int = 7 * DAY_MS
    #: Delete whole old segments while the log is larger than this; -1 = no limit.
    retention_bytes: int = -1
    #: Delete whole old segments whose newest record is older than this; -1 = keep forever.
    retention_ms: int = 7 * DAY_MS
    #: Largest batch accepted by append (Kafka: max.message.bytes, default ~1 MiB).
    batch_bytes_max: int = 1 * MiB
    #: Bytes of log between two sparse index entries (Kafka: index.interval.bytes).
    index_interval_bytes: int = 4 * KiB
    #: Largest .index/.timeindex file; a segment rolls when either is full (segment.index.bytes).
    index_bytes_max: int = 10 * MiB
    #: fsync after this many records appended since the last flush; None = leave it to the OS.
    flush_messages: int | None = None
    #: fsync when the last flush is older than this; None = leave it to the OS.
    flush_ms: int | None = None

    def __post_init__(self) -> None:
        _check_range("segment_bytes", self.segment_bytes, SEGMENT_BYTES_MIN_LIMIT, SEGMENT_BYTES_MAX_LIMIT)
        _check_range("segment_ms", self.segment_ms, 1, 1 << 62)
        _check_range("retention_bytes", self.retention_bytes, -1, 1 << 62)
        _check_range("retention_ms", self.retention_ms, -1, 1 << 62)
        _check_range("batch_bytes_max", self.batch_bytes_max, 64, BATCH_BYTES_MAX_LIMIT)
        _check_range("index_interval_bytes", self.index_interval_bytes, 0, 1 << 30)
        _check_range("index_bytes_max", self.index_bytes_max, 64, 1 << 30)
        if self.flush_messages is not None:
            _check_range("flush_messages", self.flush_messages, 1, 1 << 62)
        if self.flush_ms is not None:
            _check_range("flush_ms", self.flush_ms, 0, 1 << 62)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None) -> "LogConfig":
        """Build from ``{name: value}``; names may be ours or Kafka's dotted ones; values may be strings."""
        if not values:
            return cls()
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_name, raw_value in values.items():
            name = topic_config_name(raw_name)
            if name not in known:
                raise ConfigError(f"unknown topic config {raw_name!r}; known: {', '.join(sorted(known))}")
            kwargs[name] = _parse_int(raw_name, raw_value)
        return cls(**kwargs)

    @classmethod
    def canonical_mapping(cls, values: Mapping[str, Any] | None) -> dict[str, int | None]:
        """``{"retention.ms": "1000"} -> {"retention_ms": 1000}``: names as ours, values parsed
        and checked (by building the config), so that what is stored is what is meant."""
        if values is not None and (not isinstance(values, Mapping)
                                   or not all(isinstance(k, str) for k in values)):
            raise ConfigError(f"topic config must map names (strings) to values, got {values!r}")
        cls.from_mapping(values)
        return {topic_config_name(name): _parse_int(name, value) for name, value in (values or {}).items()}

    def replace(self, **changes: Any) -> "LogConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_KAFKA_NAMES = {
    "segment.bytes": "segment_bytes",
    "segment.ms": "segment_ms",
    "retention.bytes": "retention_bytes",
    "retention.ms": "retention_ms",
    "max.message.bytes": "batch_bytes_max",
    "index.interval.bytes": "index_interval_bytes",
    "segment.index.bytes": "index_bytes_max",
    "flush.messages": "flush_messages",
    "flush.ms": "flush_ms",
}


def topic_config_name(raw_name: str) -> str:
    """Our name for a topic setting given by our name or Kafka's dotted one."""
    return _KAFKA_NAMES.get(raw_name, raw_name.replace(".", "_").replace("-", "_"))


def _parse_int(name: str, value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text in ("none", "off", ""):
        return None
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _check_range(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside [{low}, {high}]")
