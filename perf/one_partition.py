"""One partition owned in this process with one producer ring into it: the setup the
single-process harnesses share (bench_drain_round.py, callgrind_partition_loop.py).

    with one_partition("cg-loop-", monotonic_ms=...) as p:
        p.commit(frame_of_records)   # one frame, stamped like the Producer's
        p.owner.step() / p.owner.drainer.round() ...
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
RING_BYTES = 1 << 20


@dataclass
class OnePartition:
    owner: object      # PartitionOwner of topic "t", partition 0
    ring: object       # RingProducer registered in its control region

    def commit(self, values: list) -> None:
        """Writes one frame holding one batch of ``values``, as the Producer does (producer
        fields -1: not idempotent)."""
        from shmbroker import records

        self.ring.try_send_many([records.encode_batch(values)])


@contextlib.contextmanager
def one_partition(prefix: str, monotonic_ms=None):
    """A data dir under perf/out, its control region, one READY ring and the owner; all
    removed on exit."""
    from shmbroker.config import LogConfig
    from shmbroker.layout import shm as L
    from shmbroker.partition.owner import PartitionOwner
    from shmbroker.shm import names
    from shmbroker.shm.control import ControlRegion
    from shmbroker.shm.ring import RingProducer

    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix=prefix, dir=os.path.join(HERE, "out"))
    broker = names.broker_prefix(data_dir)
    control = ControlRegion.create(names.control_name(broker, "t", 0), 0)
    slot, generation = control.claim_slot(RING_BYTES)
    ring = RingProducer.create(names.ring_name(broker, "t", 0, slot, generation), RING_BYTES,
                               partition=0, slot=slot, generation=generation, control=control)
    control.set_slot_state(slot, L.SLOT_READY)
    control.announce_registry_change()
    kwargs = {} if monotonic_ms is None else {"monotonic_ms": monotonic_ms}
    owner = PartitionOwner(data_dir, "t", 0, LogConfig(),
                           control=ControlRegion.attach(control.name), **kwargs)
    try:
        yield OnePartition(owner, ring)
    finally:
        owner.shutdown()
        owner.close()
        ring.close()
        control.unlink()
        control.close()
        shutil.rmtree(data_dir, ignore_errors=True)
