"""dump.py: kafka-dump-log style output of .log/.index/.timeindex, and verify mode."""
from __future__ import annotations

import glob
import io
import os

from log_helpers import batch

from shmbroker import records
from shmbroker.log.dump import EXIT_CORRUPT, EXIT_OK, EXIT_UNREADABLE, dump_log, preview

T0 = 1_700_000_000_000


def _log_dir(open_log):
    log = open_log(segment_bytes=1024, index_interval_bytes=100)
    log.append(records.encode_batch([b"hello", None, b"\x00\x01binary"], keys=[b"k", None, b""],
                                    headers=[[("trace", b"t1")], None, None], timestamp=T0))
    for i in range(30):
        log.append(batch([b"v%02d" % i], timestamp=T0 + i))
    log.close()
    return log.directory


def test_dump_prints_batches_and_records_like_kafka_dump_log(open_log):
    directory = _log_dir(open_log)
    out = io.StringIO()
    first = sorted(glob.glob(os.path.join(directory, "*.log")))[0]
    assert dump_log([first], out) == EXIT_OK
    text = out.getvalue()
    assert f"Dumping {first}" in text and "Log starting offset: 0" in text
    assert ("baseOffset: 0 lastOffset: 2 count: 3 " in text and "position: 0 CreateTime: "
            f"{T0} size: " in text and "magic: 2 compresscodec: none crc: " in text)
    assert "isvalid: true" in text
    assert "| offset: 0 CreateTime: %d keySize: 1 valueSize: 5 headerKeys: [trace] headers: [trace=t1] key: k payload: hello" % T0 in text
    assert "| offset: 1 " in text and "valueSize: -1" in text and "payload: null" in text
    assert "payload: 0x0001" in text


def test_dump_prints_index_and_time_index_entries(open_log):
    directory = _log_dir(open_log)
    out = io.StringIO()
    paths = sorted(glob.glob(os.path.join(directory, "00000000000000000000.*index")))
    assert dump_log(paths, out, verify=True) == EXIT_OK
    text = out.getvalue()
    assert "offset: " in text and " position: " in text
    assert f"timestamp: {T0}" in text


def test_verify_reports_corruption_with_file_and_position(open_log):
    directory = _log_dir(open_log)
    path = sorted(glob.glob(os.path.join(directory, "*.log")))[0]
    second = len(records.encode_batch([b"hello", None, b"\x00\x01binary"], keys=[b"k", None, b""],
                                      headers=[[("trace", b"t1")], None, None], timestamp=T0))
    with open(path, "r+b") as f:
        f.seek(second + 70)
        f.write(b"\xff")
    out = io.StringIO()
    assert dump_log([path], out, verify=True) == EXIT_CORRUPT
    text = out.getvalue()
    assert f"CORRUPT {path} position {second}: CRC-32C mismatch" in text
    assert "isvalid: false" in text
    assert "baseOffset: 4 " in text  # the walk goes on past a batch with a bad CRC
    assert dump_log([path], io.StringIO(), verify=False) == EXIT_OK


def test_verify_reports_a_torn_tail(open_log):
    directory = _log_dir(open_log)
    path = sorted(glob.glob(os.path.join(directory, "*.log")))[-1]
    os.truncate(path, os.path.getsize(path) - 5)
    out = io.StringIO()
    assert dump_log([path], out, verify=True) == EXIT_CORRUPT
    assert "truncated batch" in out.getvalue() and path in out.getvalue()


def test_dump_refuses_files_that_are_not_segments(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("x")
    out = io.StringIO()
    assert dump_log([str(other), str(tmp_path / "00000000000000000000.log")], out) == EXIT_UNREADABLE
    assert "not a segment file" in out.getvalue() and "Cannot read" in out.getvalue()


def test_preview_is_text_when_printable_else_hex():
    assert preview(None) == "null"
    assert preview(b"plain text") == "plain text"
    assert preview(b"\x00\xff") == "0x00ff"
    assert preview(b"a" * 50) == "a" * 40 + "...(50 bytes)"
