"""PartitionOwner: what the partition process does, without the process.

Open the log (recovering it), attach the partition's control region (created by the supervisor
and kept across restarts of this process), take over the rings producers registered there,
and then, one :meth:`step` at a time: drain committed frames into the log, publish the new
high watermark, apply the flush policy and retention. :meth:`wait_for_work` sleeps on the
doorbell futex when there is nothing to do. :meth:`shutdown` is the clean stop (stop taking
new frames, drain what is committed, flush, publish). Design: docs/design/partition.md.

Owned by the partition process's main thread; not thread-safe (the log's SegmentFlusher
thread only rings this process's doorbell). Takes clocks so tests can drive retention without
sleeping, and ``flush_fsync`` so they can hold or fail a rolled segment's background fsync.
"""
from __future__ import annotations

import logging
from typing import Callable

from .. import errors
from ..config import (DOORBELL_SLEEP_MS_MAX, PARTITION_DOZE_MS, PARTITION_STOP_DRAIN_MS_MAX,
                      BrokerConfig, LogConfig)
from ..coordinator.topics import partition_dir
from ..layout import counters as CL
from ..layout import shm as L
from ..log import PartitionLog
from ..log.flusher import SegmentFlusher
from ..log.partition_log import wall_clock_ms
from ..native import _native
from ..shm import names
from ..shm.control import ControlRegion
from ..shm.wake import TIMEOUT as WAIT_TIMEOUT
from ..shm.counters import CountersWriter
from .drain import Drainer
from .ingress import Ingress

log = logging.getLogger("shmbroker.partition")

#: Longest sleep while a stopping process waits for a producer to read its completions.
_STOP_WAIT_MS = 10
#: Whether the doorbell sleep runs the C round as soon as it is woken (drain_sleep_round)
#: where the drainer can; tests turn it off to compare with the round run from step().
SLEEP_ROUND = True
_REGISTRY_CHANGES = L.CONTROL["registry_changes"]
#: Longest doorbell sleep while a live producer holds the next offset uncommitted.
RESERVER_WAIT_MS = 5


#: time.monotonic_ns() // 1_000_000, in C (read twice a pass of the loop).
_monotonic_ms: Callable[[], int] = _native.monotonic_ms


class PartitionOwner:
    """The single writer of ``topic``/``partition`` in ``data_dir`` (see the module doc)."""

    def __init__(self, data_dir: str, topic: str, partition: int, log_config: LogConfig,
                 broker_config: BrokerConfig = BrokerConfig(),
                 clock_ms: Callable[[], int] = wall_clock_ms,
                 monotonic_ms: Callable[[], int] = _monotonic_ms,
                 control: ControlRegion | None = None, spin_ns: int = 0,
                 counters: CountersWriter | None = None,
                 flush_fsync: Callable[[int], None] | None = None):
        self.topic = topic
        self.partition = partition
        self.directory = partition_dir(data_dir, topic, partition)
        self.broker_config = broker_config
        self.spin_ns = spin_ns
        #: The last sleep ended with work (a wake-up): the next one is a doze.
        self._doze = False
        self._monotonic_ms = monotonic_ms
        prefix = names.broker_prefix(data_dir)
        if control is None:
            try:
                control = ControlRegion.attach(names.control_name(prefix, topic, partition))
            except errors.RegionNotFoundError:
                raise errors.SharedMemoryError(
                    f"the control region of partition {topic}/{partition} does not exist; the "
                    f"supervisor creates it before starting the partition process") from None
        self.control = control
        self.counters = counters if counters is not None else \
            _attach_counters(prefix, topic, partition)
        # The flusher fsyncs rolled segments on its own thread and rings our doorbell when one
        # is done, so step() writes the checkpoint soon after without polling for it.
        self.log = PartitionLog.open(self.directory, log_config, clock=clock_ms,
                                     flusher=SegmentFlusher(fsync=flush_fsync,
                                                            on_done=self.interrupt))
        self._flush_ms = log_config.flush_ms  # ms_until_due, every pass
        now = monotonic_ms()
        self._next_retention_ms = now + broker_config.retention_check_interval_ms
        self._next_reap_ms = now + DOORBELL_SLEEP_MS_MAX
        report = self.log.recovery_report
        log.info("partition %s/%d open at %s: log_start=%d log_end=%d; %s", topic, partition,
                 self.directory, self.log.log_start_offset, self.log.log_end_offset,
                 report.summary() if report is not None else "no recovery report")
        self.control.take_ownership(self.log.leader_epoch)
        # Consumers may read committed ring frames (decision 0005) unless the topic has a
        # flush policy: its records are meant to be seen once the policy flushed them.
        if log_config.flush_messages is None and log_config.flush_ms is None:
            self.control.allow_ring_reads(log_config.batch_bytes_max)
        else:
            self.control.forbid_ring_reads()
        self.ingress = Ingress(control, prefix, topic, partition)
        self.drainer = Drainer(self.log, control, self.ingress, counters=self.counters)
        #: producers_gone of the region when we attached (a predecessor's), plus ours.
        self._producers_gone_base = self.counters.values[CL.PARTITION["producers_gone"]]
        self._take_over_rings()
        self.publish()
        self.count_now()
        self.control.set_partition_status(L.PARTITION_STATUS_RUNNING)

    def _take_over_rings(self) -> None:
        """After a restart (or a kill -9 of the whole broker): every registered ring, the rings
        of producers that died meanwhile and orphans are attached, and a new control region's
        next_offset is set, which lets producers commit (decision 0005). Frames the previous
        process appended but did not release lie below the log end: the rounds recognise
        and skip them (Drainer._settle_behind)."""
        self.ingress.refresh(force=True)
        self.ingress.reap()
        self.ingress.adopt_orphans()
        self.drainer.start_offsets()
        if len(self.ingress):
            log.info("partition %s/%d: %d producer ring(s) attached", self.topic,
                     self.partition, len(self.ingress))

    # -- the data plane -------------------------------------------------------------------------

    def publish(self) -> None:
        """High watermark, log start and the active segment's end, for consumers."""
        self.drainer.publish()

    def step(self) -> int:
        """Do the work that is due; returns how much was done (0: nothing, the loop may sleep)."""
        done = 0
        now = self._monotonic_ms()
        if now >= self._next_reap_ms:
            self._next_reap_ms = now + DOORBELL_SLEEP_MS_MAX
            self.ingress.reap()
            self.count_now()
        ingress = self.ingress
        # ControlRegion.registry_changes without the property: one load per pass.
        if _native.atomic_load_u32(self.control.buf, _REGISTRY_CHANGES) != ingress.registry_seen:
            ingress.refresh()
        drained = self.drainer.round()  # publishes before it acknowledges
        if drained:
            done += drained
        else:
            done += len(ingress.retire_finished())
        if self.log.maybe_flush():
            done += 1
        if self.log.roll_flushes_pending and self.log.collect_flushes():
            done += 1  # a rolled segment is durable now: recovery point and checkpoint moved
        if now >= self._next_retention_ms:
            done += self._apply_retention(now)
        return done

    def _apply_retention(self, now: int) -> int:
        self._next_retention_ms = now + self.broker_config.retention_check_interval_ms
        deleted = self.log.delete_old_segments()
        if deleted:
            log.info("partition %s/%d: retention deleted segments %s", self.topic,
                     self.partition, deleted)
            self.publish()
            self.counters.values[CL.PARTITION["segments_deleted"]] += len(deleted)
            self.count_now()
        return len(deleted)

    def count_now(self) -> None:
        """Every counter of the region from the current state (at start, every reap interval
        (DOORBELL_SLEEP_MS_MAX), after retention, at close): the gauges a drain round does
        not touch (log start, segments, fsyncs, ring fill of rings held back) stay at most
        that stale. One C call."""
        v = self.counters.values
        P = CL.PARTITION
        segments, log_bytes = self.drainer.refresh_disk()
        v[P["high_watermark"]] = self.log.high_watermark
        v[P["log_bytes"]] = log_bytes
        v[P["ring_fill_percent"]] = self.drainer.ring_fill_percent(
            [r for r in self.ingress if r.broken is None])
        v[P["producers"]] = len(self.ingress)
        v[P["log_start_offset"]] = self.log.log_start_offset
        v[P["segments"]] = segments
        self.drainer.count_fsyncs()
        v[P["producers_gone"]] = self._producers_gone_base + self.ingress.producers_gone
        self.counters.store()

    def ms_until_due(self) -> int:
        """How long the loop may sleep before :meth:`step` has periodic work (dead producers,
        retention, flush.ms); new frames wake it earlier (doorbell)."""
        # (Comparisons, not min/max: each builtin call costs ~400 instructions per pass.)
        retention, reap = self._next_retention_ms, self._next_reap_ms
        due = (retention if retention < reap else reap) - self._monotonic_ms()
        flush_ms = self._flush_ms
        if flush_ms is not None and flush_ms < due:
            due = flush_ms
        return due if due > 0 else 0

    def wait_for_work(self, timeout_ms: int, stop_requested: Callable[[], bool] = lambda: False
                      ) -> bool:
        """Sleep on the doorbell futex until a producer commits frames, a ring appears, a
        signal arrives or ``timeout_ms`` passes. Race-free (docs/design/shm.md, wake-ups): the
        sleeping flag is raised before the last look at the rings. True when the wake-up ran
        a C round that appended (drain_sleep_round): a full round's work is done, so the loop
        may look again before it steps (see process.run_loop)."""
        control = self.control
        ingress = self.ingress
        if self.drainer.blocked_by is not None:
            return self._wait_for_reserver(timeout_ms, stop_requested)
        if self.drainer.owed_flushable():
            return False  # the next step writes them
        registry_seen = ingress.registry_seen
        # One C call: ControlRegion.sleep_prepare, then registry_changes against
        # registry_seen and IngressRing.readable for every ring that is read (-1: work).
        seen = _native.drain_sleep_prepare(control.buf,
                                           -1 if registry_seen is None else registry_seen,
                                           ingress.live_consumers())
        try:
            if seen < 0 or stop_requested():
                control.sleep_cancel()
                return False
            plan = self.drainer.sleep_round_plan() if SLEEP_ROUND else None
        except BaseException:
            control.sleep_cancel()
            raise
        # The futex wait, then sleep_cancel, in one call (whatever ends the wait); where the
        # drainer can, the C round too, so a wake-up publishes before any Python runs (on the
        # round trip's critical path: perf/RESULTS.md, eighth session). What is left of the
        # round (positions, log bookkeeping, counters) runs after it, off that path.
        timeout_ms = int(timeout_ms)
        timeout_ms = timeout_ms if timeout_ms > 1 else 1
        # A doze right after a wake-up with work (more is likely to come: commits meanwhile
        # wake nobody, the doze's end takes them); after a doze that found nothing, a sleep.
        doze_ms = PARTITION_DOZE_MS if self._doze else 0
        if plan is None:
            woken = _native.drain_sleep(control.buf, seen, timeout_ms, self.spin_ns,
                                        doze_ms) != WAIT_TIMEOUT
            self._doze = woken
            return False
        handled = self.drainer.sleep_round(plan, seen, timeout_ms, self.spin_ns, doze_ms,
                                           registry_seen, PARTITION_DOZE_MS)
        self._doze = handled >= 0 and not self.drainer.ended_idle
        return handled > 0

    def _wait_for_reserver(self, timeout_ms: int, stop_requested: Callable[[], bool]) -> bool:
        """The last round found the next offset reserved by a live producer that has not
        committed it (Drainer.blocked_by): other rings may be readable, but nothing can be
        appended before that commit, which rings the doorbell. Sleep on it (at most
        RESERVER_WAIT_MS: a producer stopped in that window is looked at again, and the
        reap finds it if it died), race-free as the ordinary sleep."""
        control = self.control
        seen = control.sleep_prepare()
        if stop_requested() or self.drainer.reserver_moved():
            control.sleep_cancel()
            return False
        timeout_ms = max(1, min(int(timeout_ms), RESERVER_WAIT_MS))
        _native.drain_sleep(control.buf, seen, timeout_ms, self.spin_ns)
        return False

    def interrupt(self) -> None:
        """From a signal handler: make a current or next doorbell sleep return at once."""
        if self.control.buf is not None:
            _native.atomic_add_u32(self.control.buf, L.CONTROL["doorbell"], 1)
            _native.futex_wake(self.control.buf, L.CONTROL["doorbell"])

    # -- stopping -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Clean stop: mark the partition stopping, drain every committed frame (bounded by
        PARTITION_STOP_DRAIN_MS_MAX), publish. Then :meth:`close`."""
        self.control.set_partition_status(L.PARTITION_STATUS_STOPPING)
        deadline = self._monotonic_ms() + PARTITION_STOP_DRAIN_MS_MAX
        self.ingress.refresh(force=True)
        self.ingress.reap()
        while self._monotonic_ms() < deadline:  # bounded by the deadline
            if self.drainer.round():
                continue
            waiting = [r for r in self.ingress
                       if r.broken is None and (r.consumer.has_unread() or r.owed)]
            if not waiting:
                break
            # Held back: their producers have COMPLETIONS_MAX completions unread (poll nudged
            # them); they read them and ring the doorbell.
            self.wait_for_work(_STOP_WAIT_MS)
        left = [r.name for r in self.ingress
                if r.broken is None and (r.consumer.has_unread() or r.owed)]
        if left:
            log.warning("partition %s/%d: stopping with committed frames left in %s (their "
                        "producers did not read their completions)", self.topic,
                        self.partition, left)
        self.publish()

    def close(self, stopped: bool = True) -> None:
        """Flush and close the log (writes its .clean-shutdown marker), detach the rings and
        the control region. ``stopped``: tell producers the partition stopped for good (a
        clean stop); False when the process exits on an error and will be restarted."""
        try:
            self.count_now()
        except (errors.ShmbrokerError, OSError) as exc:  # a broken log must not hide its error
            log.warning("partition %s/%d: counters not updated at close: %s", self.topic,
                        self.partition, exc)
        self.log.close()
        self.drainer.count_fsyncs()  # close() flushes
        self.counters.store()
        self.counters.close()
        if stopped:
            self.control.set_partition_status(L.PARTITION_STATUS_STOPPED)
        self.ingress.close()
        self.control.close()
        drainer = self.drainer
        log.info("partition %s/%d closed cleanly at log_end=%d; %d drain rounds, %d of them "
                 "in C (%d run by wake-ups, in %d calls); C round declined: %s", self.topic,
                 self.partition, self.log.log_end_offset, drainer.rounds, drainer.native_rounds,
                 drainer.sleep_rounds, drainer.sleep_calls, drainer.native_declined or "never")


def _attach_counters(prefix: str, topic: str, partition: int) -> CountersWriter:
    """The counters region the supervisor created for this partition; a private one (nobody
    sees it) when there is none: a partition process run without a supervisor (tests, perf)."""
    name = names.counters_name(prefix, "partition", topic, partition)
    try:
        return CountersWriter.attach(name, CL.KIND_PARTITION)
    except errors.RegionNotFoundError:
        log.debug("no counters region %s: counting privately", name)
        return CountersWriter.private(CL.KIND_PARTITION)
