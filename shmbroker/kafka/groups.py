"""Kafka's group APIs served by our coordinator's groups (docs/design/kafka.md, "Groups").

    Kafka client --JoinGroup/SyncGroup/Heartbeat/LeaveGroup/OffsetCommit/OffsetFetch-->
        KafkaServer --(CoordinatorLink: a DEALER, msgpack requests of coordinator/protocol.py)-->
        coordinator ROUTER: the same groups and committed offsets native clients use

A Kafka consumer and a native ``Consumer`` in one group are members of one coordinator group:
the listener translates each Kafka request into the coordinator's request and its reply (or
typed error, whose code is Kafka's) into the Kafka response. Nothing about groups is kept here,
so a restarted listener loses nothing.

The loop never waits for the coordinator. A request is sent and its Kafka response slot stays
unfilled until the reply comes (CoordinatorLink.poll, from the server's loop); responses still
leave each connection in request order because the server's slots do. A JoinGroup is held by
the coordinator until the join phase ends (up to the rebalance timeout), exactly the wait a
Kafka client expects of JoinGroup.

Owned by the kafka process's loop; not thread-safe.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import zmq

from .. import errors
from ..config import GROUP_JOIN_REPLY_MARGIN_MS
from ..coordinator import protocol
from ..coordinator.assignors import ASSIGNORS
from ..coordinator.address import endpoint as coordinator_endpoint
from . import messages as M

log = logging.getLogger("shmbroker.kafka")

#: Coordinator requests of the listener awaiting replies; beyond it a group request is answered
#: COORDINATOR_NOT_AVAILABLE (retriable: the client asks again) rather than queued without end.
KAFKA_COORDINATOR_INFLIGHT_MAX = 4_096
#: How long a non-join coordinator request may take before its client hears
#: COORDINATOR_NOT_AVAILABLE (the coordinator restarted and lost it, or is stuck).
KAFKA_COORDINATOR_TIMEOUT_MS = 10_000
#: Replies taken from the coordinator's socket per loop turn.
_REPLIES_PER_TURN = 1_024
#: The Kafka protocol type of consumers; others (Kafka Connect's "connect") are refused.
CONSUMER_PROTOCOL_TYPE = "consumer"
UNKNOWN_SERVER_ERROR = -1
COORDINATOR_NOT_AVAILABLE = errors.CoordinatorNotAvailableError.code

#: Groups one DescribeGroups may ask about (each is a coordinator request); the rest are
#: answered INVALID_REQUEST.
KAFKA_DESCRIBE_GROUPS_MAX = 1_000

Reply = Callable[[Any], None]  # a result dict, or a ShmbrokerError


def error_code(exc: BaseException) -> int:
    """The Kafka error code of a failure (our codes are Kafka's; -1 is Kafka's unknown)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and code not in (None, 0) else UNKNOWN_SERVER_ERROR


class CoordinatorLink:
    """Requests to the coordinator from the listener's loop, answered by callback.

    ``request`` sends and returns; ``poll`` (every loop turn) takes the replies that came and
    calls each request's ``on_reply`` with the result dict or the typed error; a request with
    no reply by its deadline gets CoordinatorNotAvailableError (the coordinator restarted and
    lost it: the Kafka client looks the coordinator up again and retries, as with Kafka)."""

    def __init__(self, data_dir: str, context: zmq.Context | None = None):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(coordinator_endpoint(data_dir))
        self._ids = 0
        #: request id -> (deadline, type, on_reply); dicts keep sending order.
        self.pending: dict[int, tuple[float, str, Reply]] = {}

    @property
    def fd(self) -> int:
        """Readable when replies may have come (edge-triggered: poll drains every turn)."""
        return self.socket.getsockopt(zmq.FD)

    def request(self, request_type: str, timeout_ms: int, on_reply: Reply, **fields: Any) -> None:
        if len(self.pending) >= KAFKA_COORDINATOR_INFLIGHT_MAX:
            on_reply(errors.CoordinatorNotAvailableError(
                f"{len(self.pending)} coordinator requests in flight; try again"))
            return
        self._ids += 1
        try:
            self.socket.send(protocol.request(self._ids, request_type, **fields), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EAGAIN: no coordinator connected (it restarts)
            on_reply(errors.CoordinatorNotAvailableError(f"coordinator unreachable: {exc}"))
            return
        self.pending[self._ids] = (time.monotonic() + timeout_ms / 1000.0, request_type, on_reply)

    def poll(self) -> None:
        """Answer what came and what is overdue; bounded per call."""
        for _ in range(_REPLIES_PER_TURN):
            try:
                body = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                reply_id, result = protocol.decode_reply(body)
            except errors.ShmbrokerError as exc:
                log.warning("unreadable coordinator reply dropped: %s", exc)
                continue
            entry = self.pending.pop(reply_id, None) if isinstance(reply_id, int) else None
            if entry is not None:  # else: a late reply to a request answered as timed out
                entry[2](result)
        if self.pending:
            now = time.monotonic()
            overdue = [rid for rid, (deadline, _, _) in self.pending.items() if deadline <= now]
            for rid in overdue:  # bounded by pending
                _, request_type, on_reply = self.pending.pop(rid)
                on_reply(errors.CoordinatorNotAvailableError(
                    f"no coordinator reply to {request_type}; it may have restarted"))

    def next_deadline(self) -> float | None:
        return min(d for d, _, _ in self.pending.values()) if self.pending else None

    def close(self) -> None:
        self.socket.close(linger=0)


class KafkaGroups:
    """One handler per group API; ``respond(slot, body bytes)`` fills the Kafka response."""

    def __init__(self, link: CoordinatorLink, broker: M.Broker,
                 respond: Callable[[Any, bytes], None],
                 partitions_of: Callable[[str], int | None]):
        self.link = link
        self.broker = broker
        self.respond = respond
        self.partitions_of = partitions_of
        #: InitProducerId: ids handed out by this process; the high bits are the start time so
        #: that a restarted listener does not hand out an id again (see init_producer_id).
        self._producer_ids = (int(time.time()) & 0x7FFFFFFF) << 20
        self._pid = os.getpid()

    # -- FindCoordinator --------------------------------------------------------------------------

    def find_coordinator(self, slot, version: int, body) -> None:
        key, key_type = body
        if key_type != 0:  # transactions: not served, so there is no transaction coordinator
            self.respond(slot, M.find_coordinator_response(
                version, COORDINATOR_NOT_AVAILABLE, "transactions are not served", None))
            return
        # One broker: it is every group's coordinator (the coordinator process behind it).
        self.respond(slot, M.find_coordinator_response(version, M.NONE, None, self.broker))

    # -- JoinGroup --------------------------------------------------------------------------------

    def join_group(self, slot, version: int, body: M.JoinGroupData, client_id: str | None,
                   peer: str) -> None:
        def fail(code: int) -> None:
            self.respond(slot, M.join_group_response(version, code, -1, "", "", body.member_id, []))

        if body.protocol_type != CONSUMER_PROTOCOL_TYPE:
            fail(errors.InconsistentGroupProtocolError.code)
            return
        # Our coordinator assigns with its own assignors; a Kafka assignor name it does not
        # know (kafka-python's "sticky", say) is dropped from the offer, not an error.
        known = [(name, meta) for name, meta in body.protocols if name in ASSIGNORS]
        if not known:
            fail(errors.InconsistentGroupProtocolError.code)
            return
        try:
            topics = M.decode_subscription_topics(known[0][1])
        except errors.InvalidRequestError:
            fail(errors.InvalidRequestError.code)
            return

        def on_reply(result) -> None:
            if isinstance(result, Exception):
                fail(error_code(result))
                return
            members = [(mid, instance, M.encode_subscription(member_topics))
                       for mid, instance, member_topics in result.get("members", [])]
            self.respond(slot, M.join_group_response(
                version, M.NONE, result["generation_id"], result["protocol"],
                result["leader_id"], result["member_id"], members))

        rebalance_timeout_ms = body.rebalance_timeout_ms if body.rebalance_timeout_ms > 0 \
            else body.session_timeout_ms
        # A Kafka member has no pid the coordinator could watch: the host names the Kafka peer
        # (never this host), so only its session timeout ends it (a kill -9'd Kafka client is
        # removed after its session timeout, as in Kafka). The pid is the listener's.
        self.link.request(
            "join", max(0, rebalance_timeout_ms) + GROUP_JOIN_REPLY_MARGIN_MS, on_reply,
            group_id=body.group_id, member_id=body.member_id,
            group_instance_id=body.group_instance_id, client_id=client_id or "",
            pid=self._pid, host=f"kafka:{peer}", topics=topics,
            protocols=[name for name, _ in known], session_timeout_ms=body.session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms)

    # -- SyncGroup, Heartbeat, LeaveGroup ---------------------------------------------------------

    def sync_group(self, slot, version: int, ref: M.MemberRef) -> None:
        def on_reply(result) -> None:
            if isinstance(result, Exception):
                self.respond(slot, M.sync_group_response(version, error_code(result), b""))
            else:
                self.respond(slot, M.sync_group_response(
                    version, M.NONE, M.encode_assignment(tuple(tp) for tp in result["assignment"])))

        self.link.request("sync", KAFKA_COORDINATOR_TIMEOUT_MS, on_reply, group_id=ref.group_id,
                          member_id=ref.member_id, generation_id=ref.generation_id,
                          group_instance_id=ref.group_instance_id)

    def heartbeat(self, slot, version: int, ref: M.MemberRef) -> None:
        self.link.request("heartbeat", KAFKA_COORDINATOR_TIMEOUT_MS, self._error_only(slot, version),
                          group_id=ref.group_id, member_id=ref.member_id,
                          generation_id=ref.generation_id, group_instance_id=ref.group_instance_id)

    def leave_group(self, slot, version: int, ref: M.MemberRef) -> None:
        self.link.request("leave", KAFKA_COORDINATOR_TIMEOUT_MS, self._error_only(slot, version),
                          group_id=ref.group_id, member_id=ref.member_id)

    def _error_only(self, slot, version: int) -> Reply:
        def on_reply(result) -> None:
            code = error_code(result) if isinstance(result, Exception) else M.NONE
            self.respond(slot, M.error_only_response(version, code))
        return on_reply

    # -- OffsetCommit, OffsetFetch ----------------------------------------------------------------

    def offset_commit(self, slot, version: int, body: M.OffsetCommitData) -> None:
        """The coordinator accepts or refuses a commit whole; a partition that does not exist
        is answered UNKNOWN_TOPIC_OR_PARTITION here, so it cannot spoil the others."""
        rows = [(name, [[index, M.NONE] for index, _, _ in parts]) for name, parts in body.topics]
        offsets: dict[str, list] = {}
        sent = []
        for (name, parts), (_, out) in zip(body.topics, rows):  # bounded by the request
            count = self.partitions_of(name)
            for (index, offset, metadata), row in zip(parts, out):
                if count is None or not 0 <= index < count:
                    row[1] = errors.UnknownTopicOrPartitionError.code
                elif any(p[0] == index for p in offsets.get(name, ())):
                    row[1] = errors.InvalidRequestError.code  # the same partition twice
                else:
                    offsets.setdefault(name, []).append([index, offset, metadata or ""])
                    sent.append(row)
        if not sent:
            self.respond(slot, M.offset_commit_response(version, rows))
            return

        def on_reply(result) -> None:
            if isinstance(result, Exception):
                for row in sent:
                    row[1] = error_code(result)
            self.respond(slot, M.offset_commit_response(version, rows))

        ref = body.member
        self.link.request("offset_commit", KAFKA_COORDINATOR_TIMEOUT_MS, on_reply,
                          group_id=ref.group_id, member_id=ref.member_id,
                          generation_id=ref.generation_id,
                          group_instance_id=ref.group_instance_id, offsets=offsets)

    def offset_fetch(self, slot, version: int, body) -> None:
        group_id, topics = body
        asked = None if topics is None else {name: list(parts) for name, parts in topics}

        def on_reply(result) -> None:
            if isinstance(result, Exception):
                code = error_code(result)
                if version >= 2:
                    self.respond(slot, M.offset_fetch_response(version, [], code))
                else:  # v1 has no top-level error: each partition carries it
                    self.respond(slot, M.offset_fetch_response(version, [
                        (name, [(p, -1, "", code) for p in parts]) for name, parts in topics or []
                    ], M.NONE))
                return
            got = result.get("offsets", {})
            order = [name for name, _ in topics] if topics is not None else sorted(got)
            out = [(name, [(e[0], e[1], e[2] if e[1] >= 0 else "", M.NONE)
                           for e in got.get(name, [])]) for name in order]
            self.respond(slot, M.offset_fetch_response(version, out, M.NONE))

        self.link.request("offset_fetch", KAFKA_COORDINATOR_TIMEOUT_MS, on_reply,
                          group_id=group_id, topics=asked)

    # -- ListGroups, DescribeGroups (what admin tools show; `shmbroker groups` reads the same) ----

    def list_groups(self, slot, version: int, body) -> None:
        def on_reply(result) -> None:
            if isinstance(result, Exception):
                self.respond(slot, M.list_groups_response(version, error_code(result), []))
                return
            self.respond(slot, M.list_groups_response(version, M.NONE, [
                (g["group_id"], _protocol_type(g)) for g in result["groups"]]))

        self.link.request("groups_list", KAFKA_COORDINATOR_TIMEOUT_MS, on_reply)

    def describe_groups(self, slot, version: int, group_ids: list[str]) -> None:
        """One coordinator request per group (``group_describe``, what `shmbroker groups
        describe` shows); the response when the last has its answer."""
        described: list = [None] * len(group_ids)
        left = [len(group_ids)]

        def answer(index: int, group: M.DescribedGroup) -> None:
            described[index] = group
            left[0] -= 1
            if left[0] == 0:
                self.respond(slot, M.describe_groups_response(version, described))

        if not group_ids:
            self.respond(slot, M.describe_groups_response(version, []))
        for index, group_id in enumerate(group_ids):  # bounded by the request's array
            if index >= KAFKA_DESCRIBE_GROUPS_MAX:
                answer(index, M.DescribedGroup(errors.InvalidRequestError.code, group_id, "", "",
                                               ""))
                continue
            self.link.request("group_describe", KAFKA_COORDINATOR_TIMEOUT_MS,
                              lambda result, i=index, g=group_id: answer(i, _described(g, result)),
                              group_id=group_id)

    # -- InitProducerId ---------------------------------------------------------------------------

    def init_producer_id(self, slot, version: int, body) -> None:
        """A fresh producer id, epoch 0, for an idempotent producer; its batches' sequences
        are then checked by the listener (idempotence.py, which also says what is not
        guaranteed). Transactional ids are refused: transactions are not served."""
        transactional_id, _ = body
        if transactional_id is not None:
            self.respond(slot, M.init_producer_id_response(
                version, errors.InvalidRequestError.code, -1, -1))
            return
        self._producer_ids += 1
        self.respond(slot, M.init_producer_id_response(version, M.NONE,
                                                       self._producer_ids, 0))


def _protocol_type(summary: dict) -> str:
    """Every group of ours is a consumer group; one known only by its committed offsets
    (no members, no protocol) is listed with "" as Kafka lists such groups."""
    return CONSUMER_PROTOCOL_TYPE if summary.get("members") or summary.get("protocol") else ""


def _client_host(host: str) -> str:
    """Kafka's form for a Kafka member ("/127.0.0.1": its peer address, as Kafka shows it);
    a native member's host name as the coordinator has it."""
    if host.startswith("kafka:"):
        return "/" + host[len("kafka:"):].rsplit(":", 1)[0]
    return host


def _described(group_id: str, result) -> M.DescribedGroup:
    """The coordinator's ``group_describe`` reply (or error) as Kafka describes a group. As
    in Kafka, an unknown group is no error: state Dead, no members; and members carry their
    subscription and assignment only while the group is Stable."""
    if isinstance(result, errors.GroupIdNotFoundError):
        return M.DescribedGroup(M.NONE, group_id, "Dead", "", "")
    if isinstance(result, Exception):
        return M.DescribedGroup(error_code(result), group_id, "", "", "")
    stable = result["state"] == "Stable"
    members = tuple(
        M.DescribedMember(
            m["member_id"], m.get("group_instance_id"), m.get("client_id") or "",
            _client_host(m.get("host") or ""),
            M.encode_subscription(m.get("topics") or []) if stable else b"",
            M.encode_assignment(tuple(tp) for tp in m.get("assignment") or ()) if stable else b"")
        for m in result["members"])
    return M.DescribedGroup(M.NONE, group_id, result["state"],
                            _protocol_type({"members": len(members),
                                            "protocol": result.get("protocol")}),
                            result.get("protocol") or "", members)
