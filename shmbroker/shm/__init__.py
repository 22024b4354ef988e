"""Shared memory: named regions, the ingress ring, the partition control region, wake-ups,
stale cleanup. Design: docs/design/shm.md; byte layouts: shmbroker/layout/shm.py.

    names.py      one name prefix per broker instance (shmb.<hash of data dir>.)
    region.py     create (O_EXCL, 0600) / attach (magic, version, size checked) / close / unlink
    liveness.py   owner pid + start time: is the process that owns a region alive?
    wake.py       futex wait / wake on 32-bit words of a region
    control.py    the partition control region: published state (seqlock), doorbell, registry
    ring.py       the ingress ring, producer side and consumer side
    ring_reference.py  pure-Python twin of the C ring routines (tests only)
    stale.py      what a killed run left behind, by owner pid
"""
from .control import ControlRegion, PartitionState, SlotInfo
from .names import broker_prefix, control_name, ring_name
from .region import Region
from .ring import Completion, ReadBatch, RingConsumer, RingProducer

__all__ = ["Completion", "ControlRegion", "PartitionState", "ReadBatch", "Region",
           "RingConsumer", "RingProducer", "SlotInfo", "broker_prefix", "control_name",
           "ring_name"]
