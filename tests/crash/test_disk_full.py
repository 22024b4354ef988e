"""A full disk under a broker (a 3 MiB tmpfs this test mounts): the partition process says
so in one log line and exits (restarted with backoff), producers get RequestTimeoutError for
what waited too long, and once there is room again every record is in the log exactly once,
in order, and a record sent then gets its own offset. Needs root (mount); skipped without."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from broker_harness import WAIT_S_MAX, Broker, wait_for

from shmbroker import Admin, Consumer, Producer, errors

VALUE = b"x" * 1000
SENT = 5_000  # ~5 MB of records for a 3 MiB file system


@pytest.fixture
def small_fs():
    path = tempfile.mkdtemp(prefix="shmb-fs-", dir="/tmp")
    if os.geteuid() != 0:
        os.rmdir(path)
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_a_full_disk_loses_nothing_and_the_broker_appends_again_once_there_is_room(small_fs,
                                                                                  tmp_path):
    data_dir = os.path.join(small_fs, "data")
    log_path = tmp_path / "broker.log"
    broker = Broker(data_dir, log_path).start()
    try:
        with Admin(broker=data_dir) as admin:
            admin.create_topic("full", 1, {"segment.bytes": 1 << 20})
        producer = Producer(broker=data_dir, delivery_timeout_ms=2_000, send_timeout_ms=30_000)
        try:
            futures = [producer.send("full", VALUE + b"%05d" % i, partition=0)
                       for i in range(SENT)]
            outcomes = [f.exception(timeout=WAIT_S_MAX) for f in futures]
            timed_out = sum(isinstance(e, errors.RequestTimeoutError) for e in outcomes)
            assert timed_out > 0 and all(e is None or isinstance(e, errors.RequestTimeoutError)
                                         for e in outcomes), {type(e) for e in outcomes}
            text = log_path.read_text()
            assert "cannot append" in text and "No space left on device" in text
            assert "Traceback" not in text
            assert broker.proc.poll() is None  # the supervisor (the broker) is still up
            subprocess.run(["mount", "-o", "remount,size=64m", small_fs], check=True)
            # The restarted partition appends what waited in the ring (its restart may be a
            # backoff of seconds away, longer than this producer's delivery timeout), then
            # this record.
            with Admin(broker=data_dir) as admin:
                wait_for(lambda: admin.end_offsets("full") == {0: SENT}, WAIT_S_MAX,
                         "the restarted partition to append every record that waited")
            last = producer.send("full", b"after", partition=0).result(timeout=WAIT_S_MAX)
        finally:
            producer.close(timeout=5)
        assert last.offset == SENT
        with Consumer("full", broker=data_dir, auto_offset_reset="earliest") as consumer:
            got: list = []
            deadline = time.monotonic() + WAIT_S_MAX
            while len(got) < SENT + 1 and time.monotonic() < deadline:  # bounded
                got += consumer.poll(timeout_ms=200, max_records=5_000)
        assert [r.offset for r in got] == list(range(SENT + 1))
        assert [r.value for r in got] == [VALUE + b"%05d" % i for i in range(SENT)] + [b"after"]
    finally:
        broker.cleanup()


def test_a_full_disk_is_a_storage_error_for_commits_and_topic_changes_not_a_dead_coordinator(
        small_fs, tmp_path):
    data_dir = os.path.join(small_fs, "data")
    log_path = tmp_path / "broker.log"
    broker = Broker(data_dir, log_path).start()
    try:
        with Admin(broker=data_dir) as admin:
            admin.create_topic("c", 1)
        with Producer(broker=data_dir) as producer:
            producer.send("c", b"v", partition=0).result(timeout=WAIT_S_MAX)
        with Consumer("c", broker=data_dir, group="g", auto_offset_reset="earliest",
                      enable_auto_commit=False) as consumer:
            got: list = []
            deadline = time.monotonic() + WAIT_S_MAX
            while not got and time.monotonic() < deadline:  # bounded
                got += consumer.poll(timeout_ms=200)
            filler = os.path.join(small_fs, "filler")
            with open(filler, "wb") as f:
                with pytest.raises(OSError):
                    for _ in range(1_000):  # bounded: 64 MiB, more than the file system
                        f.write(b"\0" * 65536)
                        f.flush()
            with pytest.raises(errors.LogError, match="No space left"):
                consumer.commit()
            with Admin(broker=data_dir) as admin:
                with pytest.raises(errors.LogError, match="could not write to its data dir"):
                    admin.create_topic("c2", 1)
                assert admin.list_topics() == ["c"]  # nothing half-made
            assert not [n for n in os.listdir(data_dir) if n.endswith(".tmp")]
            # A partition killed now is restarted; the supervisor cannot write runtime.json
            # about it (it crashed with a traceback on that once) and goes on regardless.
            pid = broker.partition_pids(broker.runtime())[("c", 0)]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: "cannot write" in log_path.read_text(), WAIT_S_MAX,
                     "the supervisor to say runtime.json cannot be written")
            assert broker.proc.poll() is None
            os.unlink(filler)
            wait_for(lambda: "written again" in log_path.read_text(), WAIT_S_MAX,
                     "runtime.json to be written once there is room")
            consumer.commit()
            assert consumer.committed(("c", 0)) == 1
            with Admin(broker=data_dir) as admin:
                admin.create_topic("c2", 1)
                assert admin.list_topics() == ["c", "c2"]
        assert "Traceback" not in log_path.read_text()
    finally:
        broker.cleanup()
