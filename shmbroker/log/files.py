"""Segment file names and the few file-system operations the log relies on.

A partition directory holds, per segment, three files named after the segment's base offset
(the offset of its first record), zero-padded to 20 digits exactly as Kafka names them, so that
``ls`` sorts them in offset order and Kafka's tools recognise them::

    00000000000000000000.log          RecordBatch v2 bytes, back to back
    00000000000000000000.index        sparse offset index (see index.py)
    00000000000000000000.timeindex    sparse time index (see index.py)
    00000000000000004711.log          next segment: its first offset is 4711
    ...
    recovery-point-offset-checkpoint  offsets below this were fsynced (partition_log.py)
    .clean-shutdown                   present only between a clean close and the next open

Durability rules, in one place so every caller follows them:

* files are created 0600 and directories 0700: a partition's data is the broker user's only;
* creating, renaming or deleting a file is only durable once the *directory* is fsynced, so
  every such change is followed by :func:`fsync_dir` (callers may batch several changes and
  fsync the directory once);
* small metadata files are replaced atomically: write a temporary file, fsync it, rename it
  over the old one, fsync the directory (:func:`write_atomic`).

``os.fsync`` is looked up at call time (``os.fsync(fd)``, not ``from os import fsync``) so
tests can count calls by wrapping it.
"""
from __future__ import annotations

import contextlib
import os
import re

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIMEINDEX_SUFFIX = ".timeindex"
#: Suffix of a file being written before it is renamed into place; leftovers are deleted on open.
TMP_SUFFIX = ".tmp"
SEGMENT_SUFFIXES = (LOG_SUFFIX, INDEX_SUFFIX, TIMEINDEX_SUFFIX)

#: Kafka pads base offsets to 20 digits: the width of the largest int64 (9223372036854775807).
OFFSET_DIGITS = 20
OFFSET_MAX = (1 << 63) - 1

FILE_MODE = 0o600
DIR_MODE = 0o700

_SEGMENT_NAME = re.compile(r"^(\d{20})(\.log|\.index|\.timeindex)$")


def segment_file_name(base_offset: int, suffix: str) -> str:
    """``segment_file_name(4711, ".log") == "00000000000000004711.log"``."""
    assert 0 <= base_offset <= OFFSET_MAX, base_offset
    assert suffix in SEGMENT_SUFFIXES, suffix
    return f"{base_offset:0{OFFSET_DIGITS}d}{suffix}"


def segment_path(directory: str, base_offset: int, suffix: str) -> str:
    return os.path.join(directory, segment_file_name(base_offset, suffix))


def parse_segment_name(name: str) -> tuple[int, str] | None:
    """``"00000000000000004711.log" -> (4711, ".log")``; None for any other name.

    Only the exact 20-digit form is accepted, so that a stray ``1.log`` is never mistaken for
    a segment (and never deleted as an orphan either).
    """
    match = _SEGMENT_NAME.match(os.path.basename(name))
    if match is None:
        return None
    base_offset = int(match.group(1))
    if base_offset > OFFSET_MAX:
        return None
    return base_offset, match.group(2)


def list_segment_files(directory: str) -> dict[int, set[str]]:
    """``{base_offset: {suffixes present}}`` for every segment-named file in ``directory``."""
    found: dict[int, set[str]] = {}
    for name in os.listdir(directory):
        parsed = parse_segment_name(name)
        if parsed is not None:
            found.setdefault(parsed[0], set()).add(parsed[1])
    return found


def make_dir(directory: str) -> bool:
    """Create ``directory`` (and missing parents) with mode 0700; True if it was created.

    The parent is fsynced so that the new directory entry itself survives a crash.
    """
    if os.path.isdir(directory):
        return False
    os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
    # makedirs applies the umask, which can only remove bits; chmod makes the mode exact.
    os.chmod(directory, DIR_MODE)
    fsync_dir(os.path.dirname(os.path.abspath(directory)))
    return True


def create_file(path: str) -> None:
    """Create an empty file with mode 0600; it must not exist. Caller fsyncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def open_append(path: str, create: bool = False) -> int:
    """Open for reading and appending (O_APPEND: every write lands at the current end)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    fd = os.open(path, flags, FILE_MODE)
    return fd


def open_read(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def fsync_fd(fd: int) -> None:
    os.fsync(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make creations, renames and deletions inside ``directory`` durable."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content.

    tmp file (0600) -> write -> fsync -> rename over ``path`` -> fsync the directory.
    """
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            written = 0
            # A regular-file write may be short only on a full disk or a signal; loop, bounded
            # by the data: each round makes progress or raises.
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk: no half-written tmp file left beside ``path``
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_files(paths: list[str], *, sync_dir: bool = True) -> list[str]:
    """Unlink each existing path, then fsync their directory once; returns what was removed.

    Unlinking a file that is still mmapped is fine on Linux: the pages live on until the last
    mapping goes away, which is what lets a reader keep a view of a deleted segment.
    """
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed and sync_dir:
        for directory in sorted({os.path.dirname(os.path.abspath(p)) for p in removed}):
            fsync_dir(directory)
    return removed


def file_size(path: str) -> int:
    return os.stat(path).st_size
