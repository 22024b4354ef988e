"""files.py: segment names, modes, and the fsyncs that make file-system changes durable."""
from __future__ import annotations

import os
import stat

import pytest
from log_helpers import batch

from shmbroker.log import files


def test_segment_names_are_kafkas_20_digit_base_offsets():
    assert files.segment_file_name(0, ".log") == "00000000000000000000.log"
    assert files.segment_file_name(4711, ".index") == "00000000000000004711.index"
    assert files.segment_file_name(files.OFFSET_MAX, ".timeindex") == "09223372036854775807.timeindex"
    assert files.parse_segment_name("/x/00000000000000004711.timeindex") == (4711, ".timeindex")


@pytest.mark.parametrize("name", ["1.log", "00000000000000004711.txt", "0000000000000000471.log",
                                  "00000000000000004711.log.tmp", "99999999999999999999.log"])
def test_parse_rejects_names_that_are_not_segments(name):
    assert files.parse_segment_name(name) is None


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_log_files_are_0600_and_directory_0700(open_log, tmp_path):
    old_umask = os.umask(0o022)  # a permissive umask must not widen our modes
    try:
        log = open_log("p0", segment_bytes=600)
        for i in range(20):
            log.append(batch([b"x" * 50]))
        log.close()
    finally:
        os.umask(old_umask)
    directory = tmp_path / "p0"
    assert _mode(directory) == 0o700
    names = os.listdir(directory)
    assert len(log.segments) > 1 and any(n.endswith(".timeindex") for n in names)
    for name in names:
        assert _mode(directory / name) == 0o600, name


def test_write_atomic_replaces_content_and_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "meta"
    files.write_atomic(str(path), b"one")
    files.write_atomic(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert not (tmp_path / "meta.tmp").exists()
    assert len(synced) == 4  # file + directory, twice
    assert _mode(path) == 0o600


def test_creating_and_removing_files_fsyncs_the_directory(tmp_path, monkeypatch):
    kinds = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (kinds.append(stat.S_ISDIR(os.fstat(fd).st_mode)),
                                                  real_fsync(fd))[1])
    files.make_dir(str(tmp_path / "d"))
    assert kinds == [True]
    path = str(tmp_path / "d" / "f")
    files.create_file(path)
    assert _mode(path) == 0o600
    assert files.remove_files([path, path + ".absent"]) == [path]
    assert kinds == [True, True]
