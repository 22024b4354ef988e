"""Admin: topic management against a running broker, the way kafka-python's KafkaAdminClient
is used::

    from shmbroker import Admin
    with Admin(broker="/var/lib/shmbroker") as admin:
        admin.create_topic("orders", partitions=4, config={"retention.ms": 3_600_000})
        admin.list_topics()            # ["orders"]
        admin.describe_topic("orders") # TopicDescription(name="orders", partitions=4, ...)
        admin.alter_partitions("orders", 8)
        admin.delete_topic("orders")
        admin.list_groups()            # [{"group_id": "workers", "state": "Stable", ...}]
        admin.describe_group("workers")   # members, assignment, committed / end offsets, lag
        admin.reset_offsets("workers", "orders", "earliest")   # only while it has no members
        admin.delete_group("workers")

Requests go to the coordinator over ZeroMQ (``ipc://<data_dir>/coordinator.sock``) in the
format of shmbroker/coordinator/protocol.py. Errors come back as the exception class the
coordinator raised (``TopicAlreadyExistsError``, ``InvalidTopicError``, ``ConfigError``, ...).
Owned by one thread; not fork-safe yet (make a new Admin in the child).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import zmq

from .. import errors
from ..config import ADMIN_LIVENESS_CHECK_MS, ADMIN_REQUEST_TIMEOUT_MS, default_data_dir
from ..coordinator import protocol
from ..coordinator.address import endpoint, socket_path
from .curve import HandshakeWatch, client_keys, dealer


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: int
    topic_id: str
    created_ms: int
    #: Every setting in effect, by our names (LogConfig fields).
    config: Mapping[str, Any]
    #: Only the settings given when the topic was created.
    overrides: Mapping[str, Any]

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> "TopicDescription":
        return cls(result["name"], result["partitions"], result["topic_id"], result["created_ms"],
                   dict(result["config"]), dict(result["overrides"]))


class Admin:
    """Topic administration of the broker serving ``broker``: a data dir (local), or the
    ``tcp://host:port`` its router listens on (`serve --listen`; remote). Remote, what needs
    the partitions' shared memory (end offsets, lag, ``reset_offsets``) is not available yet:
    UnsupportedFeatureError.

    ``curve_server_key`` (the broker's public key: its ``.key`` file or Z85 text) and
    ``curve_secret_key_file`` (this client's ``.key_secret``): for a router that requires CURVE
    (client/curve.py). A refused handshake raises AuthenticationError from the request."""

    def __init__(self, broker: str | os.PathLike | None = None,
                 request_timeout_ms: int = ADMIN_REQUEST_TIMEOUT_MS,
                 curve_server_key: str | bytes | os.PathLike | None = None,
                 curve_secret_key_file: str | os.PathLike | None = None):
        where = os.fspath(broker) if broker is not None else default_data_dir()
        #: True for a broker reached through its router (tcp://...): no local checks.
        self.remote = where.startswith("tcp://")
        self.data_dir = where if self.remote else os.path.abspath(where)
        self.curve = client_keys(curve_server_key, curve_secret_key_file)
        if self.curve is not None and not self.remote:
            raise errors.ConfigError("curve_server_key / curve_secret_key_file are for a "
                                     "broker reached through its router (tcp://...); a local "
                                     "broker is reached through files of this host")
        self.request_timeout_ms = request_timeout_ms
        self._ids = itertools.count(1)
        #: Requests sent by _request_later, unanswered: id -> (deadline, type, on_reply).
        self._later: dict[int, tuple[float, str, Callable[[Any], None]]] = {}
        #: Replies to them that came while waiting for something else: (on_reply, result).
        self._arrived: list[tuple[Callable[[Any], None], Any]] = []
        self._endpoint = self.data_dir if self.remote else endpoint(self.data_dir)
        self._check_running()
        self._context = zmq.Context.instance()
        # The monitor tells when the connection to the coordinator drops (it died: kill -9,
        # restart): a request sent before that will get no reply (see _request); and when a
        # router refuses our handshake (AuthenticationError, client/curve.py).
        self._socket, self._monitor = dealer(self._context, self.curve, zmq.EVENT_DISCONNECTED,
                                             self.remote)
        self._watch = HandshakeWatch(self._monitor, self.data_dir, self.curve)
        # Do not queue requests for a coordinator that is not there: fail by the timeout.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._socket.connect(self._endpoint)

    # -- the API ----------------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, config: Mapping[str, Any] | None = None
                     ) -> TopicDescription:
        fields: dict[str, Any] = {"name": name, "partitions": partitions}
        if config is not None:
            fields["config"] = {str(k): v for k, v in dict(config).items()}
        return TopicDescription.from_result(self._request("create_topic", **fields))

    def list_topics(self) -> list[str]:
        return [t["name"] for t in self._request("list_topics")["topics"]]

    def describe_topic(self, name: str) -> TopicDescription:
        return TopicDescription.from_result(self._request("describe_topic", name=name))

    def delete_topic(self, name: str) -> None:
        self._request("delete_topic", name=name)

    def alter_partitions(self, name: str, partitions: int) -> TopicDescription:
        return TopicDescription.from_result(
            self._request("alter_partitions", name=name, partitions=partitions))

    def ping(self) -> dict[str, Any]:
        return self._request("ping")

    # -- consumer groups (docs/design/groups.md) ------------------------------------------------

    def list_groups(self) -> list[dict[str, Any]]:
        """Every group the coordinator knows (with members, or with committed offsets)."""
        return self._request("groups_list")["groups"]

    def describe_group(self, group_id: str) -> dict[str, Any]:
        """The coordinator's description (state, generation, members with pid, host and
        assignment) and ``partitions``: for every partition of the group's topics (those it
        committed to or is assigned), ``{topic, partition, committed, end, lag}`` (committed
        -1 and lag None where nothing was committed). GroupIdNotFoundError if unknown."""
        described = self._request("group_describe", group_id=group_id)
        if self.remote:
            described["partitions"] = [
                {"topic": o["topic"], "partition": o["partition"], "committed": o["offset"],
                 "end": None, "lag": None} for o in described["offsets"]]
            return described
        committed = {(o["topic"], o["partition"]): o["offset"] for o in described["offsets"]}
        topics = {t for t, _ in committed} | {t for m in described["members"]
                                              for t, _ in m.get("assignment") or []}
        rows = []
        for topic in sorted(topics):
            for partition, end in sorted(self.end_offsets(topic).items()):
                done = committed.get((topic, partition), -1)
                rows.append({"topic": topic, "partition": partition, "committed": done,
                             "end": end, "lag": None if done < 0 else max(0, end - done)})
        described["partitions"] = rows
        return described

    def delete_group(self, group_id: str) -> int:
        """Delete a group without members and its committed offsets (NonEmptyGroupError while
        it has members); returns how many committed offsets went."""
        return self._request("group_delete", group_id=group_id)["offsets_deleted"]

    def end_offsets(self, topic: str) -> dict[int, int]:
        """partition -> high watermark (the next offset), read from each partition's shared
        memory state (local: no request)."""
        return {p: state.high_watermark for p, state in self._partition_states(topic).items()}

    def reset_offsets(self, group_id: str, topic: str, to: Any) -> dict[int, int]:
        """Set the group's committed offset of every partition of ``topic``: ``to`` is
        "earliest" (log start), "latest" (end), an offset (clamped to [log start, end], as
        Kafka's tool does) or a timezone-aware ``datetime`` (the first offset whose timestamp
        is at or after it, else the end). Refused with NonEmptyGroupError while the group has
        members (their positions would overwrite it). Returns partition -> offset."""
        try:
            members = self._request("group_describe", group_id=group_id)["members"]
        except errors.GroupIdNotFoundError:
            members = []
        if members:
            raise errors.NonEmptyGroupError(
                f"group {group_id!r} has {len(members)} live member(s): stop them before "
                f"resetting its offsets")
        states = self._partition_states(topic)
        offsets = {p: _reset_target(self.data_dir, topic, p, s, to) for p, s in states.items()}
        self._request("offset_commit", group_id=group_id, member_id="", generation_id=-1,
                      offsets={topic: [[p, o, ""] for p, o in sorted(offsets.items())]})
        return offsets

    def _partition_states(self, topic: str) -> dict:
        from .metadata import LocalMetadata

        if self.remote:
            raise errors.UnsupportedFeatureError(
                f"end offsets of {topic!r} through the router ({self.data_dir}): not built yet; "
                f"run this on the broker's host with its data dir")
        metadata = LocalMetadata(self.data_dir)
        try:
            return {p: metadata.control(topic, p).read_state()
                    for p in range(metadata.partitions(topic))}
        finally:
            metadata.close()

    def close(self) -> None:
        self._later.clear()
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------

    def _check_running(self, socket_too: bool = True) -> None:
        """BrokerNotRunningError unless a broker holds the data dir's lock (and, with
        ``socket_too``, the coordinator's socket file is there: not so for an instant while
        the supervisor restarts the coordinator, which a waiting request must ride out)."""
        from ..broker.lock import broker_pid

        if self.remote:
            return  # nothing to look at from here: the request timeout decides
        if (socket_too and not os.path.exists(socket_path(self.data_dir))) or \
                broker_pid(self.data_dir) is None:
            raise errors.BrokerNotRunningError(
                f"no broker is running on data dir {self.data_dir} (start one with "
                f"`shmbroker serve --data-dir {self.data_dir}`)")

    def _request(self, request_type: str, _timeout_ms: int | None = None,
                 **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (bounded by ``_timeout_ms``, by default
        ``request_timeout_ms``: a held join waits longer, a heartbeat shorter).

        Two things end the wait before the timeout: the connection to the coordinator dropped
        after the request went (its process died; the supervisor restarts it, and the request
        died with it): CoordinatorNotAvailableError, retriable; and no broker running any more
        (looked at every ADMIN_LIVENESS_CHECK_MS): BrokerNotRunningError."""
        if self._socket is None:
            raise errors.ShmbrokerError("Admin is closed")
        request_id = next(self._ids)
        timeout_ms = self.request_timeout_ms if _timeout_ms is None else _timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        self._drop_pending_if_disconnected()  # a drop before this request is not about it
        self._send(request_type, protocol.request(request_id, request_type, **fields), deadline,
                   timeout_ms)
        while True:  # bounded by the deadline
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                self._timed_out(request_type, timeout_ms)
            ready = dict(self._poller.poll(min(remaining_ms, ADMIN_LIVENESS_CHECK_MS)))
            if self._socket in ready:
                reply_id, result = protocol.decode_reply(self._socket.recv())
                if reply_id == request_id or (reply_id is None and isinstance(result, Exception)):
                    if isinstance(result, Exception):
                        raise result
                    return result
                # A reply to a _request_later (kept for _dispatch_later), or a late reply to
                # an earlier request that timed out (dropped).
                self._keep_later(reply_id, result)
                continue
            if self._drop_pending_if_disconnected():
                raise errors.CoordinatorNotAvailableError(
                    f"{request_type}: the connection to the coordinator of {self.data_dir} "
                    f"dropped while the request was in flight (it restarts); try again")
            if not ready:
                self._check_running(socket_too=False)

    def _send(self, request_type: str, message: bytes, deadline: float,
              timeout_ms: int) -> None:
        """Send, waiting (in slices, checking the broker is there) while no coordinator is
        connected: the socket is IMMEDIATE, so nothing is queued for one that is not there."""
        assert self._socket is not None
        while True:  # bounded by the deadline; one try even when the timeout is tiny
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            self._socket.setsockopt(zmq.SNDTIMEO, max(1, min(remaining_ms, ADMIN_LIVENESS_CHECK_MS)))
            try:
                self._socket.send(message)
                return
            except zmq.Again:
                # Not connected: a refused handshake raises here, not after the timeout.
                self._drop_pending_if_disconnected()
                if time.monotonic() >= deadline:
                    self._timed_out(request_type, timeout_ms)
                self._check_running(socket_too=False)

    def _drop_pending_if_disconnected(self) -> bool:
        """Whether the connection dropped since we last looked; if so, every request still
        waiting for its reply is lost: the _request_later ones get CoordinatorNotAvailableError
        (the caller raises it for its own). AuthenticationError if a handshake was refused."""
        dropped = self._watch.poll()
        if dropped and self._later:
            for request_type, on_reply in [(t, f) for _, t, f in self._later.values()]:
                self._arrived.append((on_reply, errors.CoordinatorNotAvailableError(
                    f"{request_type}: the connection to the coordinator of {self.data_dir} "
                    f"dropped while the request was in flight (it restarts)")))
            self._later.clear()
        return dropped

    # -- replies that come later (a consumer's commit_async) --------------------------------------

    def _request_later(self, request_type: str, on_reply: Callable[[Any], None],
                       **fields: Any) -> None:
        """Send a request and return at once. ``on_reply(result or exception)`` is called from
        a later ``_dispatch_later`` on this thread, in the order the requests were sent (the
        coordinator answers one socket's requests in order); RequestTimeoutError if no reply
        comes within ``request_timeout_ms``."""
        if self._socket is None:
            raise errors.ShmbrokerError("Admin is closed")
        request_id = next(self._ids)
        self._send(request_type, protocol.request(request_id, request_type, **fields),
                   time.monotonic() + self.request_timeout_ms / 1000, self.request_timeout_ms)
        self._later[request_id] = (time.monotonic() + self.request_timeout_ms / 1000,
                                   request_type, on_reply)

    def _keep_later(self, reply_id: int | None, result: Any) -> None:
        entry = self._later.pop(reply_id, None) if isinstance(reply_id, int) else None
        if entry is not None:
            self._arrived.append((entry[2], result))

    def _dispatch_later(self, wait_ms: float = 0) -> int:
        """Run ``on_reply`` for every _request_later reply that came, waiting up to ``wait_ms``
        for the rest; those overdue get RequestTimeoutError. Returns how many are unanswered."""
        deadline = time.monotonic() + wait_ms / 1000
        while self._socket is not None and self._later:  # bounded by the deadline
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(self._poller.poll(min(remaining_ms, ADMIN_LIVENESS_CHECK_MS)))
            if self._socket in ready:
                self._keep_later(*protocol.decode_reply(self._socket.recv()))
            elif not self._drop_pending_if_disconnected() and remaining_ms <= 0:
                break
        now = time.monotonic()
        for request_id, (due, request_type, on_reply) in list(self._later.items()):
            if now >= due:
                del self._later[request_id]
                self._arrived.append((on_reply, errors.RequestTimeoutError(
                    f"{request_type}: no reply from the coordinator of {self.data_dir} within "
                    f"{self.request_timeout_ms} ms")))
        arrived, self._arrived = self._arrived, []
        for on_reply, result in arrived:
            on_reply(result)
        return len(self._later)

    def _timed_out(self, request_type: str, timeout_ms: int) -> None:
        self._check_running()
        raise errors.RequestTimeoutError(
            f"{request_type}: no reply from the coordinator of {self.data_dir} within "
            f"{timeout_ms} ms")


def _reset_target(data_dir: str, topic: str, partition: int, state, to: Any) -> int:
    """The offset ``reset_offsets`` commits for one partition (see there)."""
    import datetime

    start, end = state.log_start_offset, state.high_watermark
    if to == "earliest":
        return start
    if to == "latest":
        return end
    if isinstance(to, datetime.datetime):
        if to.tzinfo is None:
            raise errors.ConfigError(f"reset to {to!r}: give a timezone (e.g. +00:00)")
        return _first_offset_at(data_dir, topic, partition, int(to.timestamp() * 1000), end)
    if isinstance(to, int) and not isinstance(to, bool):
        return min(max(to, start), end)
    raise errors.ConfigError(f"reset to {to!r}: expected 'earliest', 'latest', an offset or "
                             f"a datetime")


def _first_offset_at(data_dir: str, topic: str, partition: int, timestamp_ms: int,
                     end: int) -> int:
    """The first offset with a timestamp >= timestamp_ms, by reading the partition from its
    start in columns (bounded by the log; an admin tool, not a hot path: Kafka's broker uses
    its time index instead, which a client cannot read yet)."""
    from .consumer import Consumer

    with Consumer(broker=data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign([(topic, partition)])
        consumer.seek_to_beginning()
        while consumer.position((topic, partition)) < end:  # bounded: every poll advances
            batches = consumer.poll_columnar(timeout_ms=1000)
            if not batches:
                break
            for batch in batches.values():
                late = (batch.timestamps >= timestamp_ms).nonzero()[0]
                if len(late):
                    return int(batch.offsets[late[0]])
    return end
