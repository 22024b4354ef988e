"""A consumer-group member as a real process, speaking the coordinator's raw protocol (no
shmbroker client classes): join, sync, heartbeat; rejoin when told to; start over with no
member id when the coordinator forgot it (after a coordinator restart). Each event is one
JSON line appended to --events, for the test to read.

    python group_member.py --data-dir D --group G --topic T --events FILE [--lifetime-s 60]

Exits by itself after --lifetime-s (bounded, in case the test that started it dies).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import time

import zmq

from shmbroker import errors
from shmbroker.coordinator import protocol

REPLY_TIMEOUT_MS = 2000
HEARTBEAT_INTERVAL_S = 0.02


class Member:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ids = itertools.count(1)
        self.context = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.member_id = ""
        self.generation_id = -1
        self.events = open(args.events, "a", buffering=1)

    def event(self, kind: str, **fields) -> None:
        self.events.write(json.dumps({"event": kind, "t": time.monotonic(), "pid": os.getpid(),
                                      "member_id": self.member_id, **fields}) + "\n")

    def ask(self, request_type: str, timeout_ms: int = REPLY_TIMEOUT_MS, **fields):
        """The result, or the error as an exception object; None when no reply came (then
        the socket is renewed: a coordinator restarted meanwhile loses what was in flight)."""
        if self.sock is None:
            self.sock = self.context.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect("ipc://" + os.path.join(self.args.data_dir, "coordinator.sock"))
        request_id = next(self.ids)
        self.sock.send(protocol.request(request_id, request_type, **fields))
        deadline = time.monotonic() + timeout_ms / 1000
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:  # bounded by deadline
            if not self.sock.poll(left_ms):
                break
            reply_id, result = protocol.decode_reply(self.sock.recv())
            if reply_id == request_id:
                return result
        self.sock.close(linger=0)
        self.sock = None
        self.event("no_reply", request=request_type)
        return None

    def join(self) -> bool:
        result = self.ask("join", timeout_ms=10_000, group_id=self.args.group, member_id=self.member_id,
                          client_id="member", pid=os.getpid(), host=socket.gethostname(),
                          topics=[self.args.topic], protocols=["range"],
                          session_timeout_ms=10_000, rebalance_timeout_ms=3_000)
        if isinstance(result, errors.UnknownMemberIdError):
            self.event("error", name=type(result).__name__, request="join")
            self.member_id = ""
            return False
        if not isinstance(result, dict):
            self.event("error", name=type(result).__name__, request="join")
            return False
        self.member_id, self.generation_id = result["member_id"], result["generation_id"]
        result = self.ask("sync", group_id=self.args.group, member_id=self.member_id,
                          generation_id=self.generation_id)
        if not isinstance(result, dict):
            self.event("error", name=type(result).__name__, request="sync")
            return False
        self.event("assigned", generation_id=self.generation_id,
                   assignment=sorted(map(tuple, result["assignment"])))
        return True

    def heartbeat_until_told(self, deadline: float) -> None:
        while time.monotonic() < deadline:  # bounded by the member's lifetime
            time.sleep(HEARTBEAT_INTERVAL_S)
            result = self.ask("heartbeat", group_id=self.args.group, member_id=self.member_id,
                              generation_id=self.generation_id)
            if isinstance(result, dict):
                continue
            name = type(result).__name__
            self.event("error", name=name, request="heartbeat")
            if isinstance(result, errors.UnknownMemberIdError):
                self.member_id = ""
            return

    def run(self) -> None:
        deadline = time.monotonic() + self.args.lifetime_s
        self.event("started")
        while time.monotonic() < deadline:  # bounded by the member's lifetime
            if self.join():
                self.heartbeat_until_told(deadline)
            else:
                time.sleep(HEARTBEAT_INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--lifetime-s", type=float, default=60.0)
    Member(parser.parse_args()).run()


if __name__ == "__main__":
    main()
