"""What a local client knows about a broker: its topics and each partition's control region.

A local client needs no request to learn metadata: the coordinator keeps topics in
``<data_dir>/topics.json`` (replaced atomically, so a reader sees the old or the new file,
never half of one), and each partition's control region is found by name from the data dir
(``shm/names.py``). The file is re-read when its modification time changes, so topics created
or altered while a client runs are seen on the next lookup.

Owned by one client object; not thread-safe. After ``fork`` a child must build its own
(``Producer``/``Consumer`` do so when they notice the pid changed).
"""
from __future__ import annotations

import os
import time

from .. import errors
from ..broker.lock import broker_pid
from ..config import PARTITION_SERVE_POLL_MS
from ..coordinator.topics import TopicMetadata, load_topics, topics_path
from ..shm import names
from ..shm.control import ControlRegion


class LocalMetadata:
    """Topics of the broker serving ``data_dir`` and attached control regions, cached."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = os.path.realpath(os.fspath(data_dir))
        self.prefix = names.broker_prefix(self.data_dir)
        self._topics_mtime_ns: int | None = None
        self._topics: dict[str, TopicMetadata] = {}
        self._controls: dict[tuple[str, int], ControlRegion] = {}
        self.pid = os.getpid()

    # -- topics ---------------------------------------------------------------------------------

    def _refresh(self) -> None:
        path = topics_path(self.data_dir)
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            if not os.path.isdir(self.data_dir):
                raise errors.BrokerNotRunningError(
                    f"no broker data directory at {self.data_dir}: start one with "
                    f"`shmbroker serve --data-dir {self.data_dir}`") from None
            mtime = -1
        if mtime != self._topics_mtime_ns:
            registry = load_topics(self.data_dir)
            self._topics = dict(registry.topics)  # topics being deleted are not in .topics
            self._topics_mtime_ns = mtime

    def topic(self, name: str, refresh: bool = True) -> TopicMetadata:
        if refresh or name not in self._topics:
            self._refresh()
        meta = self._topics.get(name)
        if meta is None:
            raise errors.UnknownTopicOrPartitionError(
                f"unknown topic {name!r} on the broker at {self.data_dir} "
                f"(known: {', '.join(sorted(self._topics)) or 'none'})")
        return meta

    def topics(self) -> dict[str, TopicMetadata]:
        """Every topic (re-read when the file changed)."""
        self._refresh()
        return self._topics

    def partitions(self, name: str) -> int:
        return self.topic(name).partitions

    def check_partition(self, name: str, partition: int) -> None:
        count = self.partitions(name)
        if not isinstance(partition, int) or not 0 <= partition < count:
            raise errors.UnknownTopicOrPartitionError(
                f"topic {name!r} has partitions 0..{count - 1}; there is no partition {partition!r}")

    # -- control regions ------------------------------------------------------------------------

    def control(self, topic: str, partition: int, wait_ms: int = 0) -> ControlRegion:
        """The (cached) control region of a partition, attached read-write (producers bump its
        doorbell and claim registry slots). BrokerNotRunningError when the broker is not up;
        while it is up, up to ``wait_ms`` for a partition not served yet (a topic created a
        moment ago: its partition process is starting)."""
        key = (topic, partition)
        region = self._controls.get(key)
        if region is not None:
            return region
        self.check_partition(topic, partition)
        name = names.control_name(self.prefix, topic, partition)
        deadline = time.monotonic() + wait_ms / 1000.0
        while True:  # bounded by the deadline
            try:
                region = ControlRegion.attach(name)
                break
            except (errors.RegionNotFoundError, errors.RegionNotReadyError) as exc:
                # Not there, or there but its partition process is still writing its header
                # (created a moment ago, or re-created by a restarted partition).
                if broker_pid(self.data_dir) is None:
                    raise errors.BrokerNotRunningError(
                        f"partition {topic}/{partition} is not being served: is `shmbroker "
                        f"serve --data-dir {self.data_dir}` running?") from None
                if time.monotonic() >= deadline:
                    waited = f" within {wait_ms} ms" if wait_ms > 0 else " (yet)"
                    state = f" ({exc})" if isinstance(exc, errors.RegionNotReadyError) else ""
                    raise errors.BrokerNotRunningError(
                        f"partition {topic}/{partition} is not being served: the broker on "
                        f"{self.data_dir} runs but has not started it{waited}{state}") from None
                # A topic created a moment ago: its partition process is starting.
                time.sleep(PARTITION_SERVE_POLL_MS / 1000.0)
        self._controls[key] = region
        return region

    def reattach(self, topic: str, partition: int) -> tuple[ControlRegion, ControlRegion | None]:
        """A fresh attach of a partition's control region whose cached one went stale (a
        restarted broker made it again, or the topic was re-created): ``(new, old)``; the
        caller closes ``old`` once nothing reads it. Raises as :meth:`control` with no wait
        (UnknownTopicOrPartitionError for a deleted topic); the old one stays cached then."""
        key = (topic, partition)
        old = self._controls.pop(key, None)
        try:
            new = self.control(topic, partition)
        except BaseException:
            if old is not None:
                self._controls[key] = old
            raise
        return new, old

    def forget(self, topic: str, partition: int) -> None:
        """Drop a cached control region (e.g. after it turned out stale)."""
        region = self._controls.pop((topic, partition), None)
        if region is not None:
            region.close()

    def close(self) -> None:
        for region in self._controls.values():
            region.close()
        self._controls.clear()
