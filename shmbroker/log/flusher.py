"""SegmentFlusher: the fsync of rolled segments, off the partition loop.

Kafka's roll schedules ``flushUptoOffsetExclusive(newSegment.baseOffset)`` on a scheduler
thread and moves the recovery point only once that flush ran. We do the same: at a roll the
log hands the old segment's files to this flusher as a :class:`FlushJob` (duplicated file
descriptors of its .log, .index and .timeindex, and the offset every byte below which is
durable once they are fsynced) and goes on appending to the new segment. Measured: the fsync
of a full 1 GiB segment took ~390 ms, during which no producer ring was drained.

Threading:

* One worker thread, started by :meth:`submit` when none runs and ending when the queue is
  empty, so an idle log holds no thread and a non-daemon thread delays the exit of a process
  by at most the fsyncs still queued (which is what we want from them anyway).
* The worker only fsyncs and closes its own descriptors, then publishes "done up to offset
  X" (:attr:`done_offset`) or the error. Everything else (recovery point, checkpoint file)
  stays with the log's owner thread, which reads these on its next step
  (:meth:`PartitionLog.collect_flushes`); ``on_done`` lets the owner be woken for that.
* The descriptors are ``os.dup``'ed at the roll and owned by the job: retention deleting the
  segment, or closing it, meanwhile only closes the segment's own descriptors, so the worker
  never fsyncs a closed or reused descriptor number (it fsyncs the unlinked inode: harmless).
* Index files are written with ``os.write`` (index.py), never through a mapping, so an fsync
  of their descriptor is all their durability needs.

Failures: an fsync error (EIO, ENOSPC...) stops the worker: later jobs are dropped (their
descriptors closed), :attr:`error` holds the first failure for good, and the owner raises it
as LogError on its next call (:meth:`raise_if_failed`), as a failed synchronous fsync did:
the partition process exits and the restarted one recovers the unflushed segments.

Jobs complete in submission order, so :attr:`done_offset` only grows.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Callable, NamedTuple

from .. import errors
from ..config import ROLL_FLUSHES_PENDING_MAX

log = logging.getLogger("shmbroker.log")


class FlushJob(NamedTuple):
    """Make every byte below ``end_offset`` durable: fsync each of ``fds`` (owned by the job,
    closed by the worker). ``paths`` name them in errors."""

    end_offset: int
    fds: tuple[int, ...]
    paths: tuple[str, ...]


class SegmentFlusher:
    """Background fsyncs of rolled segments for one PartitionLog (module doc).

    ``fsync``: the function called on each descriptor (None: ``os.fsync``, looked up at call
    time); a seam for tests that need a slow or failing disk. ``on_done``: called by the worker
    after each job (succeeded or failed), without the lock; it must be thread-safe (the
    partition owner rings its own doorbell). Methods other than the worker's are called by the
    log's owner thread.
    """

    def __init__(self, fsync: Callable[[int], None] | None = None,
                 on_done: Callable[[], None] | None = None,
                 pending_max: int = ROLL_FLUSHES_PENDING_MAX):
        assert pending_max >= 1
        self._fsync = fsync
        self.on_done = on_done
        self.pending_max = pending_max
        self._cond = threading.Condition()
        self._jobs: collections.deque[FlushJob] = collections.deque()
        self._busy = False           # the worker holds a job taken off the queue
        self._calling = False        # the worker is in on_done (wait() waits for it too)
        self._thread: threading.Thread | None = None
        self._done_offset = -1
        self._error: errors.LogError | None = None
        #: Jobs completed (for tests and counters).
        self.completed = 0

    @property
    def done_offset(self) -> int:
        """The end offset of the last job completed; -1: none yet."""
        return self._done_offset

    @property
    def error(self) -> errors.LogError | None:
        return self._error

    @property
    def pending(self) -> int:
        """Jobs submitted and not completed (queued or running)."""
        with self._cond:
            return len(self._jobs) + self._busy

    def raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise error

    def submit(self, job: FlushJob) -> None:
        """Queue ``job`` (its descriptors now belong to the flusher, even when this raises).
        Waits while ``pending_max`` jobs are queued; raises the flusher's error if it failed."""
        try:
            with self._cond:
                # Bounded by the worker: it completes or fails a job per pass.
                self._cond.wait_for(lambda: self._error is not None or
                                    len(self._jobs) + self._busy < self.pending_max)
                self.raise_if_failed()
                assert job.end_offset > self._done_offset, (job, self._done_offset)
                self._jobs.append(job)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="segment-flusher",
                                                    daemon=False)
                    self._thread.start()
                job = None  # type: ignore[assignment]
        finally:
            if job is not None:
                _close_all(job.fds)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job completed (or the flusher failed); True if so."""
        # Also until on_done returned: the owner may release what on_done touches (the
        # partition's control region) once this says everything is done.
        with self._cond:
            return self._cond.wait_for(lambda: not self._calling and (
                self._error is not None or (not self._jobs and not self._busy)), timeout_s)

    def _run(self) -> None:
        while True:  # bounded by the queue: it ends when the queue is empty
            with self._cond:
                if not self._jobs or self._error is not None:
                    self._thread = None
                    self._cond.notify_all()
                    return
                job = self._jobs.popleft()
                self._busy = True
            failure = self._flush(job)
            with self._cond:
                self._busy = False
                if failure is None:
                    self._done_offset = job.end_offset
                    self.completed += 1
                else:
                    self._error = failure
                    while self._jobs:
                        _close_all(self._jobs.popleft().fds)
                self._calling = self.on_done is not None
                self._cond.notify_all()
            if self.on_done is not None:
                try:
                    self.on_done()
                except Exception:  # the owner still sees the result on its next step
                    log.exception("segment flusher: on_done failed")
                finally:
                    with self._cond:
                        self._calling = False
                        self._cond.notify_all()

    def _flush(self, job: FlushJob) -> errors.LogError | None:
        fsync = self._fsync or os.fsync
        try:
            for fd, path in zip(job.fds, job.paths):
                try:
                    fsync(fd)
                except OSError as exc:
                    log.error("background fsync of %s failed: %s", path, exc)
                    error = errors.LogError(
                        f"background fsync of {path} (rolled segment, offsets below "
                        f"{job.end_offset}) failed: {exc}")
                    error.__cause__ = exc
                    return error
            return None
        finally:
            _close_all(job.fds)


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
