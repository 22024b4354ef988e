"""Stale cleanup after kill -9: regions are sorted by their owner's liveness (pid + start
time); those of dead owners are unlinked unless a ring still holds committed unread frames,
which is returned to be drained first; live owners' regions are left alone."""
from __future__ import annotations

import os

from shmbroker.shm import names, stale
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.region import Region, unlink
from shmbroker.shm.ring import RingConsumer, RingProducer


def _in_dead_child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_regions_found_by_owner_pid(prefix):
    live = RingProducer.create(names.ring_name(prefix, "t", 0, 0, 1), 4096)
    empty = names.ring_name(prefix, "t", 0, 1, 1)
    full = names.ring_name(prefix, "t", 0, 2, 1)
    ctl = names.control_name(prefix, "t", 0)

    def leave_regions():  # a killed process: creates and never cleans up
        RingProducer.create(empty, 4096)
        RingProducer.create(full, 4096).send_many([b"committed-1", b"committed-2"])
        ControlRegion.create(ctl, 0, registry_slots=2)
        Region.create(prefix + "r.t.0.3.1", 8192)  # killed before writing its header

    dead = _in_dead_child(leave_regions)
    infos = {i.name: i for i in stale.list_regions(prefix)}
    assert infos[full].owner_pid == dead and infos[full].committed_unread
    assert infos[live.name].owner_alive

    report = stale.find_stale(prefix)
    assert sorted(report.removed) == sorted([empty, ctl])
    assert [i.name for i in report.to_drain] == [full]
    assert [i.name for i in report.alive] == [live.name]
    assert [i.name for i in report.unreadable] == [prefix + "r.t.0.3.1"]

    cons = RingConsumer.attach(full)  # the broker drains what the dead producer committed
    rb = cons.poll()
    assert rb.data == b"committed-1committed-2"
    cons.release(rb.next_position)
    assert cons.finished()
    cons.unlink_for_dead_owner()
    cons.close()
    assert stale.find_stale(prefix, remove_unreadable=True).removed == [prefix + "r.t.0.3.1"]
    live.close()
    assert stale.list_names(prefix) == []
    assert not unlink(full)
