"""The `shmbroker` command as a user runs it: real processes, real files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from shmbroker import records
from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmbroker", *args], capture_output=True,
                          text=True, timeout=timeout)


def make_log(directory, batches: int = 6) -> None:
    log = PartitionLog.open(str(directory), LogConfig(segment_bytes=1024))
    for i in range(batches):
        log.append(records.encode_batch([b"value-%d-%d" % (i, j) for j in range(5)],
                                        keys=[b"k%d" % j for j in range(5)], timestamp=1000 + i))
    log.close()


def test_log_only_demo_writes_reads_back_and_says_what_it_did(tmp_path):
    proc = run_cli("demo", "--log-only", "--data-dir", str(tmp_path), "--records", "20000")
    assert proc.returncode == 0, proc.stderr
    assert "appended 20,000 records" in proc.stdout
    assert "read back 20,000 records" in proc.stdout
    assert os.path.exists(tmp_path / "log-demo-0" / ("0" * 20 + ".log"))


def test_broker_demo_runs_producers_and_consumers_and_stops_the_broker_cleanly(tmp_path):
    data_dir = f"/tmp/shmb-demo-{os.getpid()}"  # short: the coordinator's socket path is bounded
    try:
        proc = run_cli("demo", "--data-dir", data_dir, "--records", "20000", timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK: 20,000 of 20,000 records consumed, checksums equal" in proc.stdout
        assert "shmbroker: partition demo-events/3" in proc.stdout
        assert "exit status 0" in proc.stdout
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_dump_log_prints_every_record_of_a_partition_directory(tmp_path):
    make_log(tmp_path / "t-0")
    proc = run_cli("dump-log", str(tmp_path / "t-0"), "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("| offset:") == 30
    assert "payload: value-5-4" in proc.stdout
    assert proc.stdout.count("isvalid: true") == 6


def test_dump_log_verify_exits_nonzero_and_names_file_and_position_of_corruption(tmp_path):
    make_log(tmp_path / "t-0")
    first = tmp_path / "t-0" / ("0" * 20 + ".log")
    data = bytearray(first.read_bytes())
    scan = records.scan_batches(bytes(data))
    assert len(scan.batches) > 1, "segment_bytes=1024 should give several batches per segment"
    second_batch = scan.batches[1].position
    data[second_batch + 70] ^= 0x55  # inside the CRC'd range of a batch of a sealed segment
    first.write_bytes(bytes(data))
    proc = run_cli("dump-log", str(first), "--verify")
    assert proc.returncode == 1
    assert f"{first} position {second_batch}" in proc.stdout
    assert "CRC" in proc.stdout


def test_bad_paths_get_a_clear_message_not_a_traceback(tmp_path):
    proc = run_cli("dump-log", str(tmp_path / "nope.log"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "nope.log" in proc.stdout + proc.stderr


def test_no_subcommand_prints_help():
    proc = run_cli()
    assert proc.returncode == 2
    assert "dump-log" in proc.stdout
