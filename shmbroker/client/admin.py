"""Admin: topic management against a running broker, the way kafka-python's KafkaAdminClient
is used::

    from shmbroker import Admin
    with Admin(broker="/var/lib/shmbroker") as admin:
        admin.create_topic("orders", partitions=4, config={"retention.ms": 3_600_000})
        admin.list_topics()            # ["orders"]
        admin.describe_topic("orders") # TopicDescription(name="orders", partitions=4, ...)
        admin.alter_partitions("orders", 8)
        admin.delete_topic("orders")

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
from typing import Any, Mapping

import zmq

from .. import errors
from ..config import ADMIN_REQUEST_TIMEOUT_MS, default_data_dir
from ..coordinator import protocol
from ..coordinator.server import endpoint, socket_path


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
    """Topic administration of the broker serving ``broker`` (a data dir)."""

    def __init__(self, broker: str | os.PathLike | None = None,
                 request_timeout_ms: int = ADMIN_REQUEST_TIMEOUT_MS):
        self.data_dir = os.path.abspath(os.fspath(broker) if broker is not None else default_data_dir())
        self.request_timeout_ms = request_timeout_ms
        self._ids = itertools.count(1)
        self._endpoint = endpoint(self.data_dir)
        self._check_running()
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Do not queue requests for a coordinator that is not there: fail by the timeout.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
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

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------

    def _check_running(self) -> None:
        from ..broker.lock import broker_pid

        if not os.path.exists(socket_path(self.data_dir)) or broker_pid(self.data_dir) is None:
            raise errors.BrokerNotRunningError(
                f"no broker is running on data dir {self.data_dir} (start one with "
                f"`shmbroker serve --data-dir {self.data_dir}`)")

    def _request(self, request_type: str, **fields: Any) -> dict[str, Any]:
        if self._socket is None:
            raise errors.ShmbrokerError("Admin is closed")
        request_id = next(self._ids)
        deadline = time.monotonic() + self.request_timeout_ms / 1000
        self._socket.setsockopt(zmq.SNDTIMEO, self.request_timeout_ms)
        try:
            self._socket.send(protocol.request(request_id, request_type, **fields))
        except zmq.Again:
            self._timed_out(request_type)
        while True:  # bounded by the deadline
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                self._timed_out(request_type)
            reply_id, result = protocol.decode_reply(self._socket.recv())
            if reply_id == request_id or (reply_id is None and isinstance(result, Exception)):
                if isinstance(result, Exception):
                    raise result
                return result
            # A late reply to an earlier request that timed out: drop it.

    def _timed_out(self, request_type: str) -> None:
        self._check_running()
        raise errors.RequestTimeoutError(
            f"{request_type}: no reply from the coordinator of {self.data_dir} within "
            f"{self.request_timeout_ms} ms")
