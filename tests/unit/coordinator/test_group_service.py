"""GroupService without a socket: held joins, pid watching and timers, with a fake clock."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

import pytest

from shmbroker import errors
from shmbroker.coordinator import protocol
from shmbroker.coordinator.group_service import GroupService


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_000

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def service(tmp_path, clock):
    service = GroupService(str(tmp_path), {"t": 4}, clock, hostname=socket.gethostname())
    yield service
    service.close()


def call(service, request_type, envelope=b"peer", **fields):
    body = service.handle([envelope], 1, request_type, fields)
    if body is None:
        return None
    result = protocol.decode_reply(body)[1]
    if isinstance(result, Exception):
        raise result
    return result


def join(service, pid, member_id="", envelope=b"peer", **more):
    return call(service, "join", envelope, group_id="g", member_id=member_id, client_id="c",
                pid=pid, host=socket.gethostname(), topics=["t"], protocols=["range"],
                session_timeout_ms=10_000, rebalance_timeout_ms=5_000, **more)


def test_a_join_with_sync_is_answered_with_the_share_and_the_previous_owners_commits(service):
    first = join(service, os.getpid(), sync=True)
    assert first["assignment"] == [["t", p] for p in range(4)] and first["revoked"] == []
    assert first["offsets"] == [["t", p, -1, ""] for p in range(4)]  # nothing committed yet
    assert join(service, os.getpid(), envelope=b"second", sync=True) is None  # held
    # The first member revokes (eager): commits, then rejoins on the same connection.
    call(service, "offset_commit", group_id="g", member_id=first["member_id"], generation_id=1,
         offsets={"t": [[p, 10 + p, f"m{p}"] for p in range(4)]})
    again = join(service, os.getpid(), first["member_id"], sync=True)
    [(envelope, body)] = service.take_replies()
    second = protocol.decode_reply(body)[1]
    assert envelope == [b"second"] and again["generation_id"] == second["generation_id"] == 2
    for reply in (again, second):
        assert reply["offsets"] == [[t, p, 10 + p, f"m{p}"] for t, p in reply["assignment"]]
    assert sorted(again["assignment"] + second["assignment"]) == [["t", p] for p in range(4)]
    # No sync round: both may commit at once; the old generation may not.
    call(service, "offset_commit", group_id="g", member_id=second["member_id"], generation_id=2,
         offsets={"t": [[p, 20, ""] for _, p in second["assignment"]]})
    with pytest.raises(errors.IllegalGenerationError):
        call(service, "offset_commit", group_id="g", member_id=first["member_id"],
             generation_id=1, offsets={"t": [[0, 99, ""]]})


def test_a_join_without_sync_is_answered_as_before_and_waits_for_its_sync(service):
    first = join(service, os.getpid())
    assert set(first) == {"member_id", "generation_id", "leader_id", "protocol", "members",
                          "wake_slot", "wake_seq"}
    with pytest.raises(errors.RebalanceInProgressError):  # no share fetched yet
        call(service, "offset_commit", group_id="g", member_id=first["member_id"],
             generation_id=1, offsets={"t": [[0, 1, ""]]})


def test_a_held_join_is_answered_when_the_other_member_rejoins(service):
    first = join(service, os.getpid())
    assert first["generation_id"] == 1
    assert join(service, os.getpid(), envelope=b"second") is None  # held
    assert service.take_replies() == []
    with pytest.raises(errors.RebalanceInProgressError):
        call(service, "heartbeat", group_id="g", member_id=first["member_id"], generation_id=1)
    assert join(service, os.getpid(), first["member_id"])["generation_id"] == 2
    [(envelope, body)] = service.take_replies()
    assert envelope == [b"second"] and protocol.decode_reply(body)[1]["generation_id"] == 2


def test_a_dead_local_pid_is_reported_by_its_pidfd_at_once_not_at_a_pid_check(service, clock):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        joined = join(service, child.pid)
        service.tick()
        wait_fd = service.pid_wait_fd()
        assert wait_fd is not None
        # No pid poll is scheduled: the next deadline is the group's own (its sync, 5 s).
        assert service.next_deadline_ms() > clock.now_ms + service.pid_check_interval_ms
        assert select.select([wait_fd], [], [], 0)[0] == []
        child.kill()  # not reaped yet: a zombie is dead too
        assert select.select([wait_fd], [], [], 10)[0] == [wait_fd]  # the server's poll wakes
        service.tick()  # the clock has not moved: no interval was waited for
        with pytest.raises(errors.UnknownMemberIdError):
            call(service, "heartbeat", group_id="g", member_id=joined["member_id"], generation_id=1)
        assert select.select([wait_fd], [], [], 0)[0] == []  # reported once, pidfd closed
        assert service.next_deadline_ms() is None  # group gone, nothing to watch
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_rejoin_from_the_same_process_keeps_its_pidfd(service):
    first = join(service, os.getpid(), sync=True)
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert join(service, os.getpid(), first["member_id"], sync=True)["generation_id"] == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before
    call(service, "leave", group_id="g", member_id=first["member_id"])
    assert len(os.listdir("/proc/self/fd")) == fds_before - 1  # its pidfd closed


def test_a_pid_that_already_exited_is_refused_at_join(service):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)
    with pytest.raises(errors.InvalidRequestError):
        join(service, child.pid)


@pytest.fixture
def polling_service(tmp_path, clock):
    service = GroupService(str(tmp_path), {"t": 4}, clock, hostname=socket.gethostname(),
                           pidfds=False)
    yield service
    service.close()


def test_without_pidfds_a_dead_local_pid_removes_its_member_at_the_next_pid_check(
        polling_service, clock):
    service = polling_service
    assert service.pid_wait_fd() is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        joined = join(service, child.pid)
        assert service.next_deadline_ms() <= clock.now_ms  # a pid check is due
        service.tick()
        assert service.next_deadline_ms() == clock.now_ms + service.pid_check_interval_ms
        child.kill()
        child.wait(timeout=10)
        clock.now_ms += service.pid_check_interval_ms
        service.tick()
        assert service.next_deadline_ms() is None  # group gone, nothing to watch
        with pytest.raises(errors.UnknownMemberIdError):
            call(service, "heartbeat", group_id="g", member_id=joined["member_id"], generation_id=1)
    finally:
        child.kill()
        child.wait(timeout=10)


def test_offsets_survive_a_reopen_of_the_service(tmp_path, clock):
    service = GroupService(str(tmp_path), {"t": 4}, clock)
    call(service, "offset_commit", group_id="g", member_id="", generation_id=-1,
         offsets={"t": [[3, 9, "m"]]})
    service.close()
    service = GroupService(str(tmp_path), {"t": 4}, clock)
    try:
        assert call(service, "offset_fetch", group_id="g")["offsets"]["t"][0][:3] == [3, 9, "m"]
    finally:
        service.close()


def test_the_wake_callback_runs_once_per_rebalance_started_and_not_for_other_requests(tmp_path, clock):
    woken: list[int] = []
    service = GroupService(str(tmp_path), {"t": 4}, clock, hostname=socket.gethostname(),
                           wake_group=woken.append)
    try:
        first = join(service, os.getpid(), sync=True)
        assert woken == []  # its rebalance ended in the same call: nobody to tell
        call(service, "heartbeat", group_id="g", member_id=first["member_id"], generation_id=1)
        assert woken == []  # Stable: nothing to tell
        assert join(service, os.getpid(), envelope=b"second", sync=True) is None
        assert woken == [first["wake_slot"]]  # first must rejoin: its word moves now
        with pytest.raises(errors.RebalanceInProgressError):  # what its heartbeat then says
            call(service, "heartbeat", group_id="g", member_id=first["member_id"],
                 generation_id=1)
        join(service, os.getpid(), first["member_id"], sync=True)
        assert woken == [first["wake_slot"]]
    finally:
        service.close()


class Words:
    """The coordinator's wake words, as the server keeps them (a bump adds 1)."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def wake(self, slot: int) -> None:
        self.values[slot] = self.values.get(slot, 0) + 1

    def value(self, slot: int) -> int:
        return self.values.get(slot, 0)


def join_group(service, group_id, pid, member_id="", envelope=b"peer", protocols=("range",)):
    return call(service, "join", envelope, group_id=group_id, member_id=member_id,
                client_id="c", pid=pid, host=socket.gethostname(), topics=["t"],
                protocols=list(protocols), session_timeout_ms=10_000,
                rebalance_timeout_ms=5_000, sync=True)


def test_each_group_has_a_wake_slot_of_its_own_named_in_its_join_answers_and_freed_when_forgotten(
        tmp_path, clock):
    words = Words()
    service = GroupService(str(tmp_path), {"t": 4}, clock, hostname=socket.gethostname(),
                           wake_group=words.wake, wake_value=words.value, wake_slots=2)
    try:
        a = join_group(service, "a", os.getpid())
        b = join_group(service, "b", os.getpid())
        assert {a["wake_slot"], b["wake_slot"]} == {0, 1}  # never shared: a wake is the group's
        c = join_group(service, "c", os.getpid())
        assert "wake_slot" not in c and "wake_seq" not in c  # none left: heartbeats only
        # A rebalance of b moves b's word only.
        assert join_group(service, "b", os.getpid(), envelope=b"b2") is None
        assert words.values == {b["wake_slot"]: 1}
        # a's only member leaves: the group is forgotten at the next tick, its slot handed on.
        call(service, "leave", group_id="a", member_id=a["member_id"])
        service.tick()
        d = join_group(service, "d", os.getpid())
        assert d["wake_slot"] == a["wake_slot"] and d["wake_seq"] == 0
    finally:
        service.close()


def test_join_answers_name_the_word_before_the_wake_of_the_follow_up_they_lead_to(tmp_path, clock):
    """Cooperative: the answers that end a join phase revoke partitions, and the follow-up
    rebalance begins in the same call. The answers must name the word as it was before that
    follow-up's bump, or their members would sleep through it."""
    words = Words()
    service = GroupService(str(tmp_path), {"t": 4}, clock, hostname=socket.gethostname(),
                           wake_group=words.wake, wake_value=words.value)
    coop = ("cooperative-sticky",)
    try:
        first = join_group(service, "g", os.getpid(), protocols=coop)
        slot = first["wake_slot"]
        assert first["wake_seq"] == 0 and len(first["assignment"]) == 4
        assert join_group(service, "g", os.getpid(), envelope=b"second", protocols=coop) is None
        assert words.value(slot) == 1  # first is told to rejoin
        again = join_group(service, "g", os.getpid(), first["member_id"], protocols=coop)
        [(_, body)] = service.take_replies()
        second = protocol.decode_reply(body)[1]
        assert again["revoked"] and not second["assignment"]  # granted in the follow-up only
        assert again["wake_seq"] == second["wake_seq"] == 1
        assert words.value(slot) == 2  # the follow-up began: both see the word moved, rejoin
    finally:
        service.close()


def test_a_join_carrying_a_commit_stores_it_before_the_join_is_served_and_answers_its_outcome(service):
    first = join(service, os.getpid(), sync=True)
    assert join(service, os.getpid(), envelope=b"second", sync=True) is None  # held
    # The eager member revokes: its commit rides on its rejoin.
    again = join(service, os.getpid(), first["member_id"], sync=True,
                 commit={"generation_id": 1, "offsets": {"t": [[p, 30 + p, ""] for p in range(4)]}})
    assert again["commit"] == {"partitions": 4}
    [(_, body)] = service.take_replies()
    second = protocol.decode_reply(body)[1]
    assert "commit" not in second  # it carried none
    for reply in (again, second):  # the new owners start where the commit left off
        assert reply["offsets"] == [[t, p, 30 + p, ""] for t, p in reply["assignment"]]
    # A refused commit does not stop the join: the answer says why it was refused.
    third = join(service, os.getpid(), again["member_id"], sync=True,
                 commit={"generation_id": 1, "offsets": {"t": [[0, 99, ""]]}})
    assert third["commit"]["error"]["name"] == "IllegalGenerationError"
    assert third["generation_id"] == 2  # Stable and unchanged: answered at once
    assert call(service, "offset_fetch", group_id="g")["offsets"]["t"][0][1] == 30
    # A malformed one fails the whole request, as any malformed field does.
    for bad in ({"offsets": {}}, {"generation_id": "2", "offsets": {}},
                {"generation_id": 2, "offsets": []}, {"generation_id": 2, "offsets": {}, "x": 1}):
        with pytest.raises(errors.InvalidRequestError):
            join(service, os.getpid(), again["member_id"], sync=True, commit=bad)
