"""The coordinator's process loop: a ZeroMQ ROUTER answering protocol.py requests.

Single-threaded; owned by the coordinator process. Topic changes are made durable in
topics.json first, then the supervisor is told over the link socket it passed us
(``--supervisor-fd``, an AF_UNIX SOCK_SEQPACKET pair), and the reply waits (without blocking
other requests) until the supervisor confirms that partition processes were started or
stopped. The link carries ASCII datagrams::

    coordinator -> supervisor   b"changed <seq>"   topics.json changed; reconcile processes
    supervisor -> coordinator   b"done <seq>"      processes match every change up to <seq>

A deletion is finished (directories removed, topic dropped from "deleting") only after a
"done": removing a directory under a running partition process would break its log.

Consumer-group requests go to the :class:`~.group_service.GroupService`, which holds join
replies the same way (answered later, without blocking other requests), whose timers set the
poll timeout, and whose pidfd set (one fd, readable when a local member's process ends) is
polled beside the socket.

Counters (shmbroker/layout/counters.py, COORDINATOR table): requests by type, error replies,
commits, rebalances, groups and members, in the coordinator's counters region (created by the
supervisor), stored with one C call per pass of the loop.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from .. import errors
from ..config import COORDINATOR_REQUEST_BYTES_MAX, BrokerConfig
from ..layout import counters as CL
from ..shm import group_wake, names
from ..shm.counters import CountersWriter
from ..log import files
from . import protocol
from .address import endpoint, socket_path
from .group_service import GroupService
from .topics import TopicRegistry, load_topics, partition_dir, save_topics

log = logging.getLogger("shmbroker.coordinator")

#: Multipart messages with more frames than this are not ours (envelope + delimiter + body).
REQUEST_FRAMES_MAX = 8
#: Groups and members are counted again at most this often (a walk over every group).
GROUP_GAUGES_INTERVAL_MS = 100
_REQUEST_COUNTER = {t: CL.COORDINATOR[f"requests_{t}"] for t in CL.COORDINATOR_REQUEST_TYPES}
_C = CL.COORDINATOR
#: zmq drops a peer that sends a single message larger than this (protects memory).
ZMQ_MESSAGE_BYTES_MAX = 4 * COORDINATOR_REQUEST_BYTES_MAX


@dataclass
class _Pending:
    """A reply waiting for the supervisor to confirm change ``seq``."""

    seq: int
    envelope: list[bytes]
    request_id: int
    deadline_s: float
    finish: Callable[[bool], bytes]  # confirmed? -> reply body


class CoordinatorServer:
    def __init__(self, data_dir: str, link: socket.socket | None = None,
                 config: BrokerConfig = BrokerConfig(), clock: Callable[[], float] = time.monotonic):
        self.data_dir = os.path.abspath(data_dir)
        self.registry: TopicRegistry = load_topics(self.data_dir)
        self.link = link
        self.config = config
        self.clock = clock
        # First, before the socket is bound: it opens (and recovers) the offsets log, and a
        # coordinator that cannot must not start half-built.
        self.groups = GroupService(self.data_dir, _partition_counts(self.registry),
                                   clock_ms=lambda: int(self.clock() * 1000),
                                   wake_group=self._wake_group, wake_value=self._wake_value)
        self.counters = attach_counters(self.data_dir, "coordinator", CL.KIND_COORDINATOR)
        self._counted = (0, 0, 0)  # the GroupService's (rebalances, commits, offsets) counted
        self._gauges_at_ms = -GROUP_GAUGES_INTERVAL_MS
        self._seq = 0
        self._confirmed = 0
        self._pending: list[_Pending] = []
        #: topic being deleted -> the change seq after whose confirmation its processes are gone
        self._deleted_at_seq: dict[str, int] = {}
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, ZMQ_MESSAGE_BYTES_MAX)
        self.endpoint = endpoint(self.data_dir)
        self._bind()
        if self.registry.deleting:
            # A deletion was interrupted (crash); finish it once the supervisor confirms.
            seq = self._notify()
            self._deleted_at_seq.update({name: seq for name in self.registry.deleting})
            if self.link is None:
                self._finish_deletions(seq)

    def _bind(self) -> None:
        path = socket_path(self.data_dir)
        # A socket file left by a crashed coordinator; we run under the broker lock, so it is
        # not anybody else's.
        files.remove_files([path], sync_dir=False)
        old_umask = os.umask(0o077)
        try:
            self.socket.bind(self.endpoint)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self, stop_fd: int | None = None, is_stopped: Callable[[], bool] = lambda: False) -> None:
        """The process main loop: unbounded by design; returns once ``is_stopped()``."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if stop_fd is not None:
            poller.register(stop_fd, zmq.POLLIN)
        if self.link is not None:
            poller.register(self.link.fileno(), zmq.POLLIN)
        pid_fd = self.groups.pid_wait_fd()
        if pid_fd is not None:  # a local member's process ended: tick() reports it at once
            poller.register(pid_fd, zmq.POLLIN)
        while not is_stopped():
            timeout_ms = self._poll_timeout_ms()
            events = dict(poller.poll(timeout_ms))
            if self.socket in events:
                self._serve_some()
            if self.link is not None and self.link.fileno() in events:
                self._read_link(poller)
            self._expire_pending()
            self.groups.tick()
            self._send_group_replies()
            self._store_counters()

    def _wake_group(self, slot: int) -> None:
        """A group began a rebalance: bump its wake word in our counters region (the members
        sleep on it; shm/group_wake.py)."""
        group_wake.wake(self.counters.buf, slot)

    def _wake_value(self, slot: int) -> int:
        return group_wake.load(self.counters.buf, slot)

    def _store_counters(self) -> None:
        """The counters region from this pass of the loop: one C call (see the module doc)."""
        v = self.counters.values
        groups = self.groups
        done = (groups.rebalances, groups.commits, groups.offsets_committed)
        v[_C["rebalances"]] += done[0] - self._counted[0]
        v[_C["commits"]] += done[1] - self._counted[1]
        v[_C["offsets_committed"]] += done[2] - self._counted[2]
        self._counted = done
        now_ms = int(self.clock() * 1000)
        if now_ms - self._gauges_at_ms >= GROUP_GAUGES_INTERVAL_MS:
            self._gauges_at_ms = now_ms
            v[_C["groups"]], v[_C["members"]] = groups.live_groups_and_members()
        self.counters.store()

    def _poll_timeout_ms(self) -> int | None:
        deadlines_ms = [int(p.deadline_s * 1000) + 1 for p in self._pending]
        group_deadline_ms = self.groups.next_deadline_ms()
        if group_deadline_ms is not None:
            deadlines_ms.append(group_deadline_ms)
        if not deadlines_ms:
            return None  # idle: block until a request or a signal (0% CPU)
        return max(0, min(deadlines_ms) - int(self.clock() * 1000))

    def _send_group_replies(self) -> None:
        """Held joins that other requests or timers completed."""
        for envelope, body in self.groups.take_replies():
            self._send(envelope, body)

    def _serve_some(self) -> None:
        # Bounded: at most this many requests per wake-up, so the link is never starved.
        for _ in range(64):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not 2 <= len(frames) <= REQUEST_FRAMES_MAX:
                continue  # not a ROUTER envelope + body: nothing to answer to
            envelope, body = frames[:-1], frames[-1]
            reply = self.handle(envelope, body)
            if reply is not None:
                self._send(envelope, reply)

    def _send(self, envelope: list[bytes], body: bytes) -> None:
        try:
            self.socket.send_multipart([*envelope, body], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply dropped: client queue full")

    # -- requests ---------------------------------------------------------------------------------

    def handle(self, envelope: list[bytes], body: bytes) -> bytes | None:
        """The reply to one request body, or None when it is deferred until the supervisor
        confirms. Never raises for bad input: every ShmbrokerError becomes an error reply."""
        request_id, request_type = None, "a"
        try:
            if len(body) > COORDINATOR_REQUEST_BYTES_MAX:
                raise errors.InvalidRequestError(
                    f"request of {len(body)} bytes; the limit is {COORDINATOR_REQUEST_BYTES_MAX}")
            request_id, request_type, fields = protocol.decode_request(body)
            self.counters.values[_REQUEST_COUNTER.get(request_type, _C["requests_other"])] += 1
            if request_type in protocol.GROUP_REQUEST_TYPES:
                return self.groups.handle(envelope, request_id, request_type, fields)
            handler = getattr(self, "_on_" + request_type)
            return handler(envelope, request_id, **fields)
        except errors.ShmbrokerError as exc:
            request_id = getattr(exc, "request_id", request_id)
            self.counters.values[_C["error_replies"]] += 1
            return protocol.error_reply(request_id, exc)
        except OSError as exc:
            if exc.errno not in errors.STORAGE_ERRNOS:
                return self._internal_error(request_id, exc)
            # The data dir's file system refused a write (topics.json, a group's file): the
            # state's, not a bug; the write is atomic (temp file + rename), so nothing half.
            log.error("%s request refused: the data dir's file system: %s", request_type, exc)
            self.counters.values[_C["error_replies"]] += 1
            return protocol.error_reply(request_id, errors.LogError(
                f"{request_type}: the broker could not write to its data dir "
                f"{self.data_dir}: {exc}"))
        except Exception as exc:  # a bug in a handler must not take topic metadata offline
            return self._internal_error(request_id, exc)

    def _internal_error(self, request_id: int, exc: BaseException) -> bytes:
        log.error("request failed:\n%s", traceback.format_exc())
        self.counters.values[_C["error_replies"]] += 1
        self.counters.values[_C["internal_errors"]] += 1
        return protocol.error_reply(request_id, errors.ShmbrokerError(
            f"internal error in the coordinator: {type(exc).__name__}: {exc}"))

    def _on_ping(self, envelope, request_id: int) -> bytes:
        return protocol.ok_reply(request_id, {"pid": os.getpid(), "data_dir": self.data_dir,
                                              "protocol_version": protocol.PROTOCOL_VERSION})

    def _on_list_topics(self, envelope, request_id: int) -> bytes:
        topics = [{"name": n, "partitions": self.registry.topics[n].partitions}
                  for n in self.registry.names()]
        return protocol.ok_reply(request_id, {"topics": topics})

    def _on_describe_topic(self, envelope, request_id: int, name: str) -> bytes:
        return protocol.ok_reply(request_id, self.registry.get(name).describe())

    def _on_create_topic(self, envelope, request_id: int, name: str, partitions: int,
                         config: dict[str, Any] | None = None) -> bytes | None:
        self._commit(self.registry.create(name, partitions, config))
        log.info("created topic %s with %d partition(s) %s", name, partitions, config or {})
        return self._after_change(envelope, request_id, lambda ok: self._described(request_id, name, ok))

    def _on_alter_partitions(self, envelope, request_id: int, name: str, partitions: int) -> bytes | None:
        self._commit(self.registry.alter_partitions(name, partitions))
        log.info("topic %s now has %d partition(s)", name, partitions)
        return self._after_change(envelope, request_id, lambda ok: self._described(request_id, name, ok))

    def _on_delete_topic(self, envelope, request_id: int, name: str) -> bytes | None:
        partitions = self.registry.get(name).partitions
        self._commit(self.registry.delete(name))
        self._deleted_at_seq[name] = self._seq + 1  # the seq _after_change is about to use
        log.info("deleting topic %s (%d partition(s))", name, partitions)

        def finish(confirmed: bool) -> bytes:
            if name in self.registry.deleting:
                return protocol.error_reply(request_id, errors.RequestTimeoutError(
                    f"topic {name!r} is deleted, but its partition processes did not stop within "
                    f"{self.config.topic_change_ack_timeout_ms} ms; its directories will be "
                    f"removed once they have"))
            return protocol.ok_reply(request_id, {"name": name, "partitions": partitions})
        return self._after_change(envelope, request_id, finish)

    def _described(self, request_id: int, name: str, confirmed: bool) -> bytes:
        topic = self.registry.topics.get(name)
        if topic is None:  # deleted meanwhile
            return protocol.error_reply(request_id, errors.UnknownTopicOrPartitionError(
                f"topic {name!r} was deleted while it was being changed"))
        return protocol.ok_reply(request_id, {**topic.describe(), "processes_confirmed": confirmed})

    # -- topic changes and the supervisor ---------------------------------------------------------

    def _commit(self, registry: TopicRegistry) -> None:
        save_topics(self.data_dir, registry)  # durable before anyone is told
        self.registry = registry
        self.groups.update_partitions(_partition_counts(registry))

    def _after_change(self, envelope: list[bytes], request_id: int,
                      finish: Callable[[bool], bytes]) -> bytes | None:
        seq = self._notify()
        if self.link is None:  # no supervisor (in-process tests): nothing to wait for
            self._finish_deletions(seq)
            return finish(True)
        deadline = self.clock() + self.config.topic_change_ack_timeout_ms / 1000
        self._pending.append(_Pending(seq, envelope, request_id, deadline, finish))
        return None

    def _notify(self) -> int:
        self._seq += 1
        if self.link is not None:
            try:
                self.link.send(b"changed %d" % self._seq)
            except OSError as exc:
                log.error("cannot tell the supervisor about a topic change: %s", exc)
        return self._seq

    def _read_link(self, poller: zmq.Poller) -> None:
        assert self.link is not None
        try:
            message = self.link.recv(64)
        except BlockingIOError:
            return
        if not message:
            log.error("the supervisor closed its link; topic changes are no longer confirmed")
            poller.unregister(self.link.fileno())
            self.link.close()
            self.link = None
            return
        kind, _, seq = message.partition(b" ")
        if kind != b"done" or not seq.isdigit():
            log.error("unexpected message from the supervisor: %r", message)
            return
        self._confirmed = max(self._confirmed, int(seq))
        self._finish_deletions(self._confirmed)
        ready = [p for p in self._pending if p.seq <= self._confirmed]
        self._pending = [p for p in self._pending if p.seq > self._confirmed]
        for pending in ready:
            self._send(pending.envelope, pending.finish(True))

    def _expire_pending(self) -> None:
        now = self.clock()
        expired = [p for p in self._pending if p.deadline_s <= now]
        if not expired:
            return
        self._pending = [p for p in self._pending if p.deadline_s > now]
        for pending in expired:
            log.warning("supervisor did not confirm change %d in time; answering anyway", pending.seq)
            self._send(pending.envelope, pending.finish(False))

    def _finish_deletions(self, confirmed_seq: int) -> None:
        """Remove the directories of deleted topics whose processes the supervisor confirmed
        stopped (a "done" for an earlier change says nothing about a later deletion)."""
        for name, topic in sorted(self.registry.deleting.items()):
            if self._deleted_at_seq.get(name, confirmed_seq + 1) > confirmed_seq:
                continue
            self._deleted_at_seq.pop(name, None)
            for partition in range(topic.partitions):
                shutil.rmtree(partition_dir(self.data_dir, name, partition), ignore_errors=True)
            files.fsync_dir(self.data_dir)
            self._commit(self.registry.finish_delete(name))
            log.info("topic %s deleted; %d partition directories removed", name, topic.partitions)

    def close(self) -> None:
        self.socket.close(linger=0)
        files.remove_files([socket_path(self.data_dir)], sync_dir=False)
        self.groups.close()
        self._store_counters()
        self.counters.close()


def _partition_counts(registry: TopicRegistry) -> dict[str, int]:
    """What the groups assign: live topics only (a topic being deleted has no partitions)."""
    return {name: topic.partitions for name, topic in registry.topics.items()}


def attach_counters(data_dir: str, role: str, kind: int) -> CountersWriter:
    """The counters region the supervisor created for this process (coordinator, router); a
    private one when there is none (a server run without a supervisor, in tests)."""
    name = names.counters_name(names.broker_prefix(data_dir), role)
    try:
        return CountersWriter.attach(name, kind)
    except errors.RegionNotFoundError:
        return CountersWriter.private(kind)
