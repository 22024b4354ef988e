"""`shmbroker serve` as a process tree: names, lock, restarts, clean stop, kill -9 recovery."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from broker_harness import WAIT_S_MAX, run_cli, wait_for

from shmbroker import Admin, records
from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog

pytestmark = pytest.mark.timeout(120)


def cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def append_records(directory: str, count: int, config: LogConfig) -> None:
    """Stand-in for producers (the data plane comes later): write straight into a stopped log."""
    log = PartitionLog.open(directory, config)
    for i in range(count // 10):
        log.append(records.encode_batch([b"value-%d-%d" % (i, j) for j in range(10)], timestamp=1000 + i))
    log.close()


def test_serve_starts_supervisor_coordinator_and_one_named_process_per_partition(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("orders", 3)
        admin.create_topic("audit.log_v2", 1)
    doc = broker.wait_running({("orders", 0), ("orders", 1), ("orders", 2), ("audit.log_v2", 0)})
    by_role = {}
    for entry in doc["processes"]:
        by_role.setdefault(entry["role"], []).append(entry)
        assert cmdline(entry["pid"]) == entry["title"]
        assert entry["started_at"] > 0 and entry["state"] == "running"
    assert [e["pid"] for e in by_role["supervisor"]] == [broker.proc.pid]
    assert cmdline(broker.proc.pid) == "shmbroker: supervisor"
    assert cmdline(by_role["coordinator"][0]["pid"]) == "shmbroker: coordinator"
    titles = sorted(cmdline(e["pid"]) for e in by_role["partition"])
    assert titles == ["shmbroker: partition audit.log_v2/0", "shmbroker: partition orders/0",
                      "shmbroker: partition orders/1", "shmbroker: partition orders/2"]
    children = {p.pid for p in psutil.Process(broker.proc.pid).children()}
    assert children == {e["pid"] for e in doc["processes"][1:]}
    assert os.stat(os.path.join(broker.data_dir, "runtime.json")).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(broker.data_dir, "coordinator.sock")).st_mode & 0o777 == 0o600


def test_partition_processes_run_under_sched_batch_and_the_others_do_not(broker):
    # A woken partition must not preempt the client that rang its doorbell (config.py,
    # PARTITION_SCHED_BATCH; docs/design/partition.md, "Scheduling").
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("orders", 2)
    doc = broker.wait_running({("orders", 0), ("orders", 1)})
    policies = {e["role"]: set() for e in doc["processes"]}
    for entry in doc["processes"]:
        policies[entry["role"]].add(os.sched_getscheduler(entry["pid"]))
    assert policies["partition"] == {os.SCHED_BATCH}
    assert policies["supervisor"] == policies["coordinator"] == {os.SCHED_OTHER}


def test_second_broker_on_the_same_data_dir_is_refused_naming_pid_and_dir(broker):
    proc = run_cli("serve", "--data-dir", broker.data_dir, "--listen", "none", timeout=30)
    assert proc.returncode == 1
    assert f"another broker (pid {broker.proc.pid}) is running on data dir {broker.data_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert broker.proc.poll() is None  # the first one is untouched
    broker.wait_running()


def test_idle_broker_uses_almost_no_cpu(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("idle", 2)
    broker.wait_running({("idle", 0), ("idle", 1)})
    procs = [psutil.Process(broker.proc.pid), *psutil.Process(broker.proc.pid).children()]
    time.sleep(0.3)  # let start-up work finish
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(2.0)
    used = sum(sum(p.cpu_times()[:2]) for p in procs) - before
    print(f"idle broker, 4 processes, 2 s: {used * 1000:.0f} ms CPU")
    assert used < 0.1, f"an idle broker used {used:.3f} s of CPU in 2 s"


def test_partition_spin_option_reaches_every_partition_process_and_data_still_flows(
        make_broker):
    from shmbroker import Consumer, Producer

    broker = make_broker(serve_args=("--partition-spin-us", "300"))
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("spun", 2)
    broker.wait_running({("spun", 0), ("spun", 1)})
    for p in (0, 1):  # (setproctitle hides the command line; each process says it in the log)
        wait_for(lambda: f"partition spun/{p}: busy-waits 300 us" in broker.log(),
                 what=f"partition spun/{p} to report its spin")
    with Producer(broker=broker.data_dir) as producer:
        offset = producer.send("spun", b"spun", partition=1).result(timeout=10).offset
    with Consumer(broker=broker.data_dir) as consumer:
        consumer.assign([("spun", 1)])
        consumer.seek(("spun", 1), offset)
        assert [r.value for r in consumer.poll(timeout_ms=5_000)] == [b"spun"]
    bad = run_cli("serve", "--data-dir", broker.data_dir, "--partition-spin-us", "99999999",
                  "--listen", "none")
    assert bad.returncode != 0 and "partition_spin_us" in bad.stderr


def test_kill_9_of_a_partition_process_restarts_it_within_a_second_with_its_log_intact(make_broker):
    broker = make_broker()
    config = LogConfig(segment_bytes=4096)
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("orders", 2, config={"segment.bytes": 4096})
    assert broker.stop() == 0
    directory = os.path.join(broker.data_dir, "orders-1")
    append_records(directory, 2000, config)
    broker.start()
    doc = broker.wait_running({("orders", 0), ("orders", 1)})
    old = broker.partition_pids(doc)
    victim = old[("orders", 1)]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def restarted():
        doc = broker.runtime()
        if doc is None:
            return None
        entry = [p for p in doc["processes"] if p.get("topic") == "orders" and p.get("partition") == 1][0]
        return entry if entry["pid"] not in (None, victim) and entry["state"] == "running" else None

    entry = wait_for(restarted, WAIT_S_MAX, "the killed partition to be back", interval_s=0.005)
    elapsed = time.monotonic() - killed_at
    print(f"partition orders/1 killed with SIGKILL; back up (log recovered) after {elapsed * 1000:.0f} ms")
    assert elapsed < 3.0
    assert entry["restarts"] == 1
    assert cmdline(entry["pid"]) == "shmbroker: partition orders/1"
    assert broker.partition_pids(broker.runtime())[("orders", 0)] == old[("orders", 0)]
    assert "unclean shutdown" in broker.log()
    assert broker.stop() == 0
    log = PartitionLog.open(directory, config)
    try:
        assert log.recovery_report.clean_shutdown
        assert log.log_end_offset == 2000
        assert sum(1 for _ in _records(log)) == 2000
    finally:
        log.close()
    assert run_cli("dump-log", directory, "--verify", "--no-records").returncode == 0


def _records(log: PartitionLog):
    offset = log.log_start_offset
    while offset < log.log_end_offset:  # bounded: every read advances
        chunk = log.read(offset)
        yield from records.decode_records(bytes(chunk.data))
        offset = chunk.last_offset + 1


def test_sigterm_stops_every_process_exits_0_and_closes_logs_cleanly(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("t", 3)
    doc = broker.wait_running({("t", 0), ("t", 1), ("t", 2)})
    pids = [e["pid"] for e in doc["processes"]]
    assert broker.stop() == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for p in range(3):
        assert os.path.exists(os.path.join(broker.data_dir, f"t-{p}", ".clean-shutdown"))
    # The committed-offsets log is durable data like the topics' logs, closed cleanly too.
    assert os.path.exists(os.path.join(broker.data_dir, "__consumer_offsets-0", ".clean-shutdown"))
    leftovers = set(os.listdir(broker.data_dir)) - {"broker.lock", "topics.json", "t-0", "t-1",
                                                    "t-2", "__consumer_offsets-0"}
    assert not leftovers, f"runtime state left behind: {leftovers}"
    assert "Traceback" not in broker.log()


def test_kill_9_of_the_whole_broker_then_a_restart_recovers_the_logs(make_broker):
    broker = make_broker()
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("t", 2)
    broker.wait_running({("t", 0), ("t", 1)})
    broker.kill9()
    assert not os.path.exists(os.path.join(broker.data_dir, "t-0", ".clean-shutdown"))
    broker.start()  # the lock was released by the kernel; the stale runtime file is replaced
    broker.wait_running({("t", 0), ("t", 1)})
    assert broker.log().count("unclean shutdown, recovered") >= 2
    with Admin(broker=broker.data_dir) as admin:
        assert admin.list_topics() == ["t"]
    assert broker.stop() == 0


def test_kill_9_of_the_supervisor_alone_stops_its_children_and_frees_the_data_dir(make_broker):
    broker = make_broker()
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("t", 2)
    doc = broker.wait_running({("t", 0), ("t", 1)})
    children = [psutil.Process(e["pid"]) for e in doc["processes"][1:]]
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait(timeout=WAIT_S_MAX)
    gone, alive = psutil.wait_procs(children, timeout=WAIT_S_MAX)
    assert not alive, "children of a killed supervisor must stop (PR_SET_PDEATHSIG)"
    for p in range(2):  # they got SIGTERM, so they closed their logs
        assert os.path.exists(os.path.join(broker.data_dir, f"t-{p}", ".clean-shutdown"))
    broker.start()
    broker.wait_running({("t", 0), ("t", 1)})
    assert broker.stop() == 0


def test_killed_coordinator_is_restarted_and_serves_the_same_topics(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("t", 1)
    doc = broker.wait_running({("t", 0)})
    coordinator = [e["pid"] for e in doc["processes"] if e["role"] == "coordinator"][0]
    os.kill(coordinator, signal.SIGKILL)
    wait_for(lambda: (d := broker.runtime()) and d["state"] == "running" and
             [e["pid"] for e in d["processes"] if e["role"] == "coordinator"][0] != coordinator,
             WAIT_S_MAX, "the coordinator to be back")
    with Admin(broker=broker.data_dir) as admin:
        assert admin.list_topics() == ["t"]
        admin.create_topic("u", 1)
    broker.wait_running({("t", 0), ("u", 0)})


def test_an_invalid_topics_file_stops_serve_with_a_clear_error(broker_dir):
    with open(os.path.join(broker_dir, "topics.json"), "w") as f:
        f.write('{"format": "shmbroker-topics", "version": 9, "topics": []}')
    proc = run_cli("serve", "--data-dir", broker_dir, "--listen", "none", timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("shmbroker: error: ") and "topics.json: shmbroker-topics version 9" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(broker_dir, "runtime.json"))
