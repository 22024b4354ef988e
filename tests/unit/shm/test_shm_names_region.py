"""Names and regions: one prefix per data dir, every name starts with shmb and fits NAME_MAX;
regions are created exclusively with mode 0600, attach checks magic, version and size with a
typed error, only the creator unlinks, and nothing is registered with the resource tracker."""
from __future__ import annotations

import os
import stat
import struct
import sys

import pytest

from shmbroker import errors
from shmbroker.shm import names
from shmbroker.shm.region import Region

MAGIC = int.from_bytes(b"SHMBTEST", "little")


def test_prefix_is_per_data_dir_and_stable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "link")
    pa, pb = names.broker_prefix(tmp_path / "a"), names.broker_prefix(tmp_path / "b")
    assert pa != pb
    assert pa == names.broker_prefix(tmp_path / "link")  # realpath
    assert pa.startswith("shmb") and pa.endswith(".") and len(pa.split(".")[1]) == 8


def test_tag_separates_test_workers(tmp_path, monkeypatch):
    monkeypatch.setenv(names.TAG_ENV, "gw3")
    assert names.broker_prefix(tmp_path).startswith("shmb-gw3.")
    monkeypatch.setenv(names.TAG_ENV, "")
    assert names.broker_prefix(tmp_path).startswith("shmb.")


def test_names_are_short_legal_and_kinded(tmp_path):
    p = names.broker_prefix(tmp_path)
    c = names.control_name(p, "orders", 3)
    r = names.ring_name(p, "orders", 3, 17, 5)
    assert c == p + "c.orders.3" and r == p + "r.orders.3.17.5"
    assert names.kind_of(c, p) == "c" and names.kind_of(r, p) == "r"
    long_name = names.ring_name(p, "x" * 249, 2**31 - 1, 255, 2**32 - 1)
    odd = names.control_name(p, "a/b c", 0)
    for n in (long_name, odd):
        assert len(n) < 255 and "/" not in n and " " not in n and n.startswith("shmb")
    assert names.control_name(p, "a/b c", 0) != names.control_name(p, "a_b_c", 0)


def test_create_is_exclusive_owner_only_and_zeroed(prefix):
    name = prefix + "t.one"
    with Region.create(name, 8192) as reg:
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
        assert mode == 0o600
        assert reg.buf[:] == bytes(8192)
        with pytest.raises(errors.RegionExistsError):
            Region.create(name, 8192)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_attach_checks_magic_version_size(prefix):
    name = prefix + "t.two"
    with Region.create(name, 8192) as reg:
        with pytest.raises(errors.RegionHeaderError, match="not initialised"):
            Region.attach(name, magic=MAGIC, layout_version=1)
        reg.write_prefix(MAGIC, 1, 64)
        other = Region.attach(name, magic=MAGIC, layout_version=1)
        assert not other.owner and other.size == 8192
        with pytest.raises(AssertionError):
            other.unlink()
        other.close()
        other.close()  # idempotent
        with pytest.raises(errors.RegionHeaderError, match="bad magic"):
            Region.attach(name, magic=MAGIC + 1, layout_version=1)
        with pytest.raises(errors.RegionHeaderError, match="layout version 1"):
            Region.attach(name, magic=MAGIC, layout_version=2)
        struct.pack_into("<Q", reg.buf, 16, 4096)
        with pytest.raises(errors.RegionHeaderError, match="header says 4096"):
            Region.attach(name, magic=MAGIC, layout_version=1)


def test_a_region_its_creator_has_not_finished_is_not_ready_and_worth_a_retry(prefix):
    """Between shm_open and ftruncate a region has 0 bytes; until write_prefix stores the
    magic (last) it reads 0. Attaching then is a race with the creator, not a corruption."""
    import posix_ipc

    name = prefix + "t.early"
    unsized = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=0)
    unsized.close_fd()
    try:
        with pytest.raises(errors.RegionNotReadyError, match="not sized yet") as info:
            Region.attach(name, magic=MAGIC, layout_version=1)
        assert info.value.retriable
    finally:
        unsized.unlink()
    with Region.create(name, 8192) as reg:
        with pytest.raises(errors.RegionNotReadyError, match="magic 0") as info:
            Region.attach(name, magic=MAGIC, layout_version=1)
        assert info.value.retriable
        reg.write_prefix(MAGIC, 1, 64)
        Region.attach(name, magic=MAGIC, layout_version=1).close()
        struct.pack_into("<Q", reg.buf, 0, MAGIC + 1)
        with pytest.raises(errors.RegionHeaderError, match="bad magic") as info:
            Region.attach(name, magic=MAGIC, layout_version=1)
        assert not isinstance(info.value, errors.RegionNotReadyError)


def test_attach_missing_is_region_not_found(prefix):
    with pytest.raises(errors.RegionNotFoundError) as info:
        Region.attach(prefix + "t.none", magic=MAGIC, layout_version=1)
    assert info.value.retriable


def test_regions_are_not_registered_with_the_resource_tracker(prefix):
    """A child that runs multiprocessing's resource tracker creates a region and exits without
    unlinking it: the region survives (the tracker would have unlinked a tracked one)."""
    import subprocess

    name = prefix + "t.tracker"
    code = ("from multiprocessing import resource_tracker; resource_tracker.ensure_running()\n"
            "from shmbroker.shm.region import Region\n"
            f"Region.create({name!r}, 4096).close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "resource_tracker" not in proc.stderr
    assert os.path.exists(f"/dev/shm/{name}")
    from shmbroker.shm.region import unlink
    assert unlink(name)
