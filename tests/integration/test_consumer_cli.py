"""`shmbroker consume` as a user runs it, against partitions published by the test process."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fake_partitions import FakePartitions

from shmbroker.client.console import compile_format


@pytest.fixture
def parts(data_dir):
    fake = FakePartitions(data_dir)
    yield fake
    fake.close()


def consume(data_dir, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmbroker", "consume", *args,
                           "--data-dir", str(data_dir)], capture_output=True, timeout=timeout)


def test_prints_with_kcat_format_and_stops_at_max_messages(parts, data_dir):
    parts.create_topic("t", 1)
    parts.append("t", 0, [b"a", b"b", b"c", b"d", b"e"], keys=[b"k0", None, b"k2", b"k3", b"k4"])
    proc = consume(data_dir, "t", "--from-beginning", "--max-messages", "3",
                   "--format", r"%t/%p@%o\t%k=%s\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"t/0@0\tk0=a\nt/0@1\t=b\nt/0@2\tk2=c\n"


def test_default_format_prints_values_and_timeout_ms_ends_it(parts, data_dir):
    parts.create_topic("t", 2)
    parts.fill("t", 0, 3, size=5)
    parts.fill("t", 1, 2, size=5)
    started = time.monotonic()
    proc = consume(data_dir, "t", "--from-beginning", "--timeout-ms", "300")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [b"0:0:x", b"0:1:x", b"0:2:x", b"1:0:x", b"1:1:x"]
    assert time.monotonic() - started < 30


def test_partition_and_offset_choose_where_to_start(parts, data_dir):
    parts.create_topic("t", 2)
    parts.fill("t", 1, 10, size=5)
    proc = consume(data_dir, "t", "--partition", "1", "--offset", "7", "--timeout-ms", "200",
                   "--format", "%o %T\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"".join(b"%d 1700000000000\n" % o for o in (7, 8, 9))
    proc = consume(data_dir, "t", "--partition", "1", "--offset", "-2", "--timeout-ms", "200",
                   "--format", "%o\n")
    assert proc.stdout == b"8\n9\n"


def test_waits_for_new_records_until_max_messages(parts, data_dir):
    parts.create_topic("t", 1)
    parts.fill("t", 0, 4)
    proc = subprocess.Popen([sys.executable, "-m", "shmbroker", "consume", "t", "--data-dir",
                             str(data_dir), "--partition", "0", "--offset", "4",
                             "--max-messages", "2", "--format", "%s|"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        parts.append("t", 0, [b"new1"])
        parts.append("t", 0, [b"new2", b"new3"])
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == b"new1|new2|"


def test_unknown_topic_broker_not_running_and_group_are_clear_errors(parts, data_dir, tmp_path):
    parts.create_topic("t", 1)
    proc = consume(data_dir, "nope", "--timeout-ms", "10")
    assert proc.returncode == 1 and b"unknown topic 'nope'" in proc.stderr
    assert b"Traceback" not in proc.stderr
    missing = tmp_path / "no-broker-here"
    proc = consume(missing, "t", "--timeout-ms", "10")
    assert proc.returncode == 1 and str(missing).encode() in proc.stderr
    assert b"Traceback" not in proc.stderr
    proc = consume(data_dir, "t", "--group", "g", "--timeout-ms", "10")
    assert proc.returncode == 1 and b"consumer groups" in proc.stderr
    proc = consume(data_dir, "t", "--offset", "3", "--timeout-ms", "10")
    assert proc.returncode == 1 and b"--partition" in proc.stderr


def test_compile_format_codes_and_escapes():
    class R:
        topic, partition, offset, timestamp = "top", 3, 42, 1234
        key, value, headers = None, b"val", (("h1", b"x"), ("h2", None))

    assert compile_format(r"%t %p %o %T %k|%s %S %K %h %% \t\\")(R) == \
        b"top 3 42 1234 |val 3 -1 h1=x,h2= % \t\\"
    assert compile_format(r"%s\n")(R) == b"val\n"
    with pytest.raises(Exception, match="unknown code"):
        compile_format("%Q")


def test_from_time_starts_each_partition_at_its_first_record_at_or_after_it(parts, data_dir):
    parts.create_topic("t", 2)
    base = 1_700_000_000_000
    for i in range(5):  # partition 0: one batch a second
        parts.append("t", 0, [b"p0-%d" % i], timestamp=base + 1000 * i)
    parts.append("t", 1, [b"p1-old"], timestamp=base)
    proc = consume(data_dir, "t", "--from-time", str(base + 2500), "--timeout-ms", "300")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"p0-3\np0-4\n"  # partition 1 has nothing that late: its end
    # The same instant as ISO 8601 (UTC unless it says otherwise), one partition.
    proc = consume(data_dir, "t", "--partition", "0", "--from-time", "2023-11-14T22:13:22.500",
                   "--timeout-ms", "300", "--format", "%o\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"3\n4\n"
    proc = consume(data_dir, "t", "--from-time", "yesterday", "--timeout-ms", "10")
    assert proc.returncode == 1 and b"ISO 8601" in proc.stderr and b"Traceback" not in proc.stderr
    proc = consume(data_dir, "t", "--from-time", "0", "--from-beginning", "--timeout-ms", "10")
    assert proc.returncode == 1 and b"--from-time excludes" in proc.stderr
