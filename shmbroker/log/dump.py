"""Print segment files the way Kafka's kafka-dump-log does; optionally verify them.

Read-only: files are opened O_RDONLY and mapped read-only, so dumping a live partition cannot
hurt the broker. The CLI (``shmbroker dump-log``) is a thin wrapper around :func:`dump_log`.

Example output for a .log::

    Dumping /data/t-0/00000000000000000000.log
    Log starting offset: 0
    baseOffset: 0 lastOffset: 1 count: 2 baseSequence: -1 lastSequence: -1 producerId: -1 ...
     position: 0 CreateTime: 1700000000000 size: 79 magic: 2 compresscodec: none crc: 391470122 isvalid: true
    | offset: 0 CreateTime: 1700000000000 keySize: -1 valueSize: 5 headerKeys: [] key: null payload: hello

Exit status: 0 when everything printed is fine (or ``verify`` is off), 1 when ``verify`` found
corruption (each problem printed with its file and position), 2 when a file could not be read
or is not a segment file.
"""
from __future__ import annotations

import os
from typing import TextIO

from .. import records
from ..layout import record_batch as layout
from . import files, index
from ..records import validation
from .recovery import mapped

PREVIEW_BYTES = 40
_COMPRESSION_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}

EXIT_OK = 0
EXIT_CORRUPT = 1
EXIT_UNREADABLE = 2


def dump_log(paths: list[str], out: TextIO, verify: bool = False, print_records: bool = True,
             records_max: int | None = None) -> int:
    """Dump each of ``paths`` (.log, .index or .timeindex, or a partition directory, meaning
    every segment file in it) to ``out``; returns the exit status.

    ``records_max`` caps the record lines printed per .log file (batch lines are all printed).
    """
    status = EXIT_OK
    for path in _expand(paths):
        try:
            problems = _dump_one(path, out, verify, print_records, records_max)
        except OSError as exc:
            out.write(f"Cannot read {path}: {exc}\n")
            status = max(status, EXIT_UNREADABLE)
            continue
        except ValueError as exc:
            out.write(f"{exc}\n")
            status = max(status, EXIT_UNREADABLE)
            continue
        if verify and problems:
            for problem in problems:
                out.write(f"CORRUPT {problem}\n")
            status = max(status, EXIT_CORRUPT)
    return status


def _expand(paths: list[str]) -> list[str]:
    """Directories stand for their segment files, in offset order (.log, .index, .timeindex)."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            out.append(path)
            continue
        found = [(files.parse_segment_name(name), name) for name in os.listdir(path)]
        order = {files.LOG_SUFFIX: 0, files.INDEX_SUFFIX: 1, files.TIMEINDEX_SUFFIX: 2}
        segments = sorted((p[0], order[p[1]], name) for p, name in found if p is not None)
        out.extend(os.path.join(path, name) for _, _, name in segments)
        if not segments:
            out.append(path)  # reported as "not a segment file" below
    return out


def _dump_one(path: str, out: TextIO, verify: bool, print_records: bool,
              records_max: int | None) -> list[str]:
    parsed = files.parse_segment_name(path)
    if parsed is None:
        raise ValueError(f"{path}: not a segment file (expected <20 digits>.log|.index|.timeindex)")
    base_offset, suffix = parsed
    out.write(f"Dumping {path}\n")
    if suffix == files.LOG_SUFFIX:
        return _dump_segment(path, base_offset, out, verify, print_records, records_max)
    if suffix == files.INDEX_SUFFIX:
        return _dump_offset_index(path, base_offset, out, verify)
    return _dump_time_index(path, base_offset, out, verify)


def _dump_segment(path: str, base_offset: int, out: TextIO, verify: bool, print_records: bool,
                  records_max: int | None) -> list[str]:
    problems: list[str] = []
    records_left = records_max if records_max is not None else 1 << 62
    out.write(f"Log starting offset: {base_offset}\n")
    expected_base = base_offset
    with mapped(path) as view:
        position = 0
        end = len(view)
        # Bounded: each round moves past one batch or stops.
        while position < end:
            length = validation.batch_length_at(view, position)
            if length is None or end - position < layout.HEADER_SIZE:
                problems.append(f"{path} position {position}: {validation.describe(view, position, validation.STATUS['TRUNCATED'])}")
                out.write(f"Found {end - position} trailing bytes at position {position} that are not a whole batch\n")
                break
            header = records.read_header(view, position)
            batch_end = position + header.size
            if header.batch_length < layout.BATCH_LENGTH_MIN or batch_end > end:
                status = validation.STATUS["BAD_LENGTH" if header.batch_length < layout.BATCH_LENGTH_MIN else "TRUNCATED"]
                problems.append(f"{path} position {position}: {validation.describe(view, position, status)}")
                out.write(f"Cannot walk past position {position}: batch_length {header.batch_length}\n")
                break
            scan = records.scan_batches(view[position:batch_end], verify_crc=True, verify_records=True)
            valid = scan.status == validation.STATUS["OK"]
            if not valid:
                problems.append(f"{path} position {position}: {validation.describe(view[:batch_end], position, scan.status)}")
            elif header.base_offset != expected_base:
                problems.append(f"{path} position {position}: base_offset {header.base_offset}, expected {expected_base}")
            out.write(_batch_line(header, position, valid) + "\n")
            if print_records and valid and records_left > 0:
                for record in records.decode_records(view[position:batch_end], verify_crc=False)[:records_left]:
                    out.write(_record_line(record, header) + "\n")
                    records_left -= 1
            expected_base = header.last_offset + 1
            position = batch_end
    return problems


def _batch_line(h: records.BatchHeader, position: int, valid: bool) -> str:
    last_sequence = h.base_sequence + h.last_offset_delta if h.base_sequence >= 0 else -1
    ts_type = "LogAppendTime" if h.attributes & layout.TIMESTAMP_TYPE_MASK else "CreateTime"
    return (f"baseOffset: {h.base_offset} lastOffset: {h.last_offset} count: {h.records_count} "
            f"baseSequence: {h.base_sequence} lastSequence: {last_sequence} "
            f"producerId: {h.producer_id} producerEpoch: {h.producer_epoch} "
            f"partitionLeaderEpoch: {h.partition_leader_epoch} "
            f"isTransactional: {_bool(h.attributes & layout.TRANSACTIONAL_MASK)} "
            f"isControl: {_bool(h.attributes & layout.CONTROL_MASK)} position: {position} "
            f"{ts_type}: {h.max_timestamp} size: {h.size} magic: {h.magic} "
            f"compresscodec: {_COMPRESSION_NAMES.get(h.compression, h.compression)} "
            f"crc: {h.crc} isvalid: {_bool(valid)}")


def _record_line(record, h: records.BatchHeader) -> str:
    ts_type = "LogAppendTime" if h.attributes & layout.TIMESTAMP_TYPE_MASK else "CreateTime"
    headers = ", ".join(f"{k}={preview(v)}" for k, v in record.headers)
    key_size = -1 if record.key is None else len(record.key)
    value_size = -1 if record.value is None else len(record.value)
    return (f"| offset: {record.offset} {ts_type}: {record.timestamp} keySize: {key_size} "
            f"valueSize: {value_size} headerKeys: [{', '.join(k for k, _ in record.headers)}] "
            f"headers: [{headers}] key: {preview(record.key)} payload: {preview(record.value)}")


def preview(value: bytes | None, limit: int = PREVIEW_BYTES) -> str:
    """First ``limit`` bytes: as text when printable ASCII, else hex; ``null`` for None."""
    if value is None:
        return "null"
    head = bytes(value[:limit])
    more = f"...({len(value)} bytes)" if len(value) > limit else ""
    if all(32 <= b < 127 for b in head):
        return head.decode("ascii") + more
    return "0x" + head.hex() + more


def _bool(flag) -> str:
    return "true" if flag else "false"


def _sibling_log(path: str, base_offset: int) -> str:
    return files.segment_path(os.path.dirname(path) or ".", base_offset, files.LOG_SUFFIX)


def _log_batches(path: str, base_offset: int) -> tuple[int, dict[int, tuple[int, int]]] | None:
    """(log size, {last offset: (position, max timestamp)}) of the sibling .log, if present."""
    log_path = _sibling_log(path, base_offset)
    if not os.path.exists(log_path):
        return None
    with mapped(log_path) as view:
        scan = records.scan_batches(view, verify_crc=False)
        return len(view), {b[2]: (b[0], b[3]) for b in scan.batches}


def _dump_offset_index(path: str, base_offset: int, out: TextIO, verify: bool) -> list[str]:
    idx = index.read_offset_index_file(path, base_offset)
    for offset, position in idx.entries():
        out.write(f"offset: {offset} position: {position}\n")
    if not verify:
        return []
    log = _log_batches(path, base_offset)
    problem = idx.sanity_problem(log[0] if log else 1 << 62)
    problems = [problem] if problem else []
    if log is not None:
        for offset, position in idx.entries():
            found = log[1].get(offset)
            if found is None or found[0] != position:
                problems.append(f"{path}: entry offset {offset} -> position {position} does not "
                                f"match a batch of {_sibling_log(path, base_offset)}")
    return problems


def _dump_time_index(path: str, base_offset: int, out: TextIO, verify: bool) -> list[str]:
    idx = index.read_time_index_file(path, base_offset)
    for timestamp, offset in idx.entries():
        out.write(f"timestamp: {timestamp} offset: {offset}\n")
    if not verify:
        return []
    problem = idx.sanity_problem()
    problems = [problem] if problem else []
    log = _log_batches(path, base_offset)
    if log is not None:
        for timestamp, offset in idx.entries():
            found = log[1].get(offset)
            if found is None or found[1] != timestamp:
                problems.append(f"{path}: entry timestamp {timestamp} -> offset {offset} does not "
                                f"match a batch of {_sibling_log(path, base_offset)}")
    return problems


__all__ = ["dump_log", "preview", "EXIT_OK", "EXIT_CORRUPT", "EXIT_UNREADABLE"]
