"""Names of shared-memory objects: one prefix per broker instance.

Every object of a broker is named ``shmb.<8 hex>.<kind>.<...>``, where the 8 hex digits are a
hash of the realpath of its data dir: two brokers on two data dirs never collide, one data dir
always maps to the same names (a restarted broker finds what the previous run left), and
``ls /dev/shm | grep ^shmb`` shows everything of ours (tests/conftest.py checks it for leaks).

    shmb.1a2b3c4d.c.orders.3            control region of partition orders/3
    shmb.1a2b3c4d.r.orders.3.17.5       ingress ring of registry slot 17, generation 5
    shmb.1a2b3c4d.m.partition.orders.3  counters of the process of partition orders/3
    shmb.1a2b3c4d.m.coordinator         counters of the coordinator (and .m.router)
    shmb.1a2b3c4d.m.consumer.4242.0     counters of the first local Consumer of process 4242

Tests only: when ``SHMBROKER_SHM_TAG`` is set (tests/conftest.py sets it to the pytest-xdist
worker id), the prefix becomes ``shmb-<tag>.<8 hex>.`` so that each worker's leak check sees
only its own objects. Every process of one broker must see the same value.

Names carry no leading slash; region.py adds the one POSIX wants. A topic name that is long
or holds characters outside Kafka's legal set ``[A-Za-z0-9._-]`` is shortened to a readable
part plus a hash, so every name stays far below NAME_MAX (255).
"""
from __future__ import annotations

import hashlib
import os
import re

#: Every object name starts with this (also what tests/conftest.py looks for).
NAME_PREFIX = "shmb"
CONTROL_KIND = "c"
RING_KIND = "r"
COUNTERS_KIND = "m"
#: Longest topic part kept verbatim in a name.
TOPIC_PART_BYTES_MAX = 96

_LEGAL = re.compile(r"^[A-Za-z0-9._-]+$")


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


#: Environment variable that tags every prefix (test isolation only, see above).
TAG_ENV = "SHMBROKER_SHM_TAG"


def _tag() -> str:
    tag = re.sub(r"[^A-Za-z0-9]", "", os.environ.get(TAG_ENV, ""))[:16]
    return f"-{tag}" if tag else ""


def broker_prefix(data_dir: str | os.PathLike) -> str:
    """``shmb.<8 hex>.`` for the broker serving ``data_dir``."""
    return f"{NAME_PREFIX}{_tag()}.{_hash8(os.path.realpath(os.fspath(data_dir)))}."


def topic_part(topic: str) -> str:
    if _LEGAL.match(topic) and len(topic) <= TOPIC_PART_BYTES_MAX:
        return topic
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", topic)[:TOPIC_PART_BYTES_MAX - 9]
    return f"{readable}~{_hash8(topic)}"


def control_name(prefix: str, topic: str, partition: int) -> str:
    assert prefix.startswith(NAME_PREFIX) and prefix.endswith("."), prefix
    return f"{prefix}{CONTROL_KIND}.{topic_part(topic)}.{int(partition)}"


def ring_name(prefix: str, topic: str, partition: int, slot: int, generation: int) -> str:
    assert prefix.startswith(NAME_PREFIX) and prefix.endswith("."), prefix
    return f"{prefix}{RING_KIND}.{topic_part(topic)}.{int(partition)}.{int(slot)}.{int(generation)}"


def counters_name(prefix: str, role: str, topic: str | None = None,
                  partition: int | None = None) -> str:
    """The counters region of one broker process: ``...m.partition.<topic>.<partition>``,
    ``...m.coordinator``, ``...m.router``."""
    assert prefix.startswith(NAME_PREFIX) and prefix.endswith("."), prefix
    if role == "partition":
        assert topic is not None and partition is not None
        return f"{prefix}{COUNTERS_KIND}.partition.{topic_part(topic)}.{int(partition)}"
    assert role.isalnum(), role
    return f"{prefix}{COUNTERS_KIND}.{role}"


def consumer_counters_prefix(prefix: str) -> str:
    """What the counters region name of every local consumer starts with."""
    assert prefix.startswith(NAME_PREFIX) and prefix.endswith("."), prefix
    return f"{prefix}{COUNTERS_KIND}.consumer."


def consumer_counters_name(prefix: str, pid: int, n: int) -> str:
    """The counters region of the ``n``-th Consumer made by process ``pid``."""
    return f"{consumer_counters_prefix(prefix)}{int(pid)}.{int(n)}"


def kind_of(name: str, prefix: str) -> str | None:
    """``"c"``, ``"r"``, ``"m"`` or None for a name under ``prefix``."""
    if not name.startswith(prefix):
        return None
    kind = name[len(prefix):].split(".", 1)[0]
    return kind if kind in (CONTROL_KIND, RING_KIND, COUNTERS_KIND) else None


def ring_name_prefix(prefix: str, topic: str, partition: int) -> str:
    """What every ring name of one partition starts with (``...r.<topic>.<partition>.``)."""
    return f"{prefix}{RING_KIND}.{topic_part(topic)}.{int(partition)}."


def parse_ring_name(name: str, prefix: str) -> tuple[str, int, int, int] | None:
    """(topic part, partition, slot, generation) of a ring name under ``prefix``, else None.
    Parsed from the right: a topic part may itself contain dots."""
    if kind_of(name, prefix) != RING_KIND:
        return None
    parts = name[len(prefix) + len(RING_KIND) + 1:].rsplit(".", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return parts[0], int(parts[1]), int(parts[2]), int(parts[3])
