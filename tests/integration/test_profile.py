"""`shmbroker profile`, for real: py-spy against the processes of a live broker under load,
and each way it can fail, with its exit status and its one-line message."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys

import pytest
from broker_harness import WAIT_S_MAX, run_cli

import shmbroker
from shmbroker import Admin
from shmbroker.monitor import profile

pytestmark = pytest.mark.timeout(180)

HERE = os.path.dirname(os.path.abspath(__file__))
needs_py_spy = pytest.mark.skipif(profile.find_py_spy() is None,
                                  reason="py-spy is not installed (pip install py-spy)")


def start_producer(data_dir: str, stop_file: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(HERE, "top_load.py"), "produce",
                             data_dir, "busy", stop_file, "120"], stdin=subprocess.DEVNULL)


def stop_producer(proc: subprocess.Popen, stop_file: str) -> None:
    open(stop_file, "w").close()
    try:
        assert proc.wait(timeout=WAIT_S_MAX) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S_MAX)


@needs_py_spy
def test_profile_of_a_partition_under_load_is_a_flame_graph_of_our_functions(broker, tmp_path):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("busy", 1)
    broker.wait_running({("busy", 0)})
    stop_file = str(tmp_path / "stop")
    producer = start_producer(broker.data_dir, stop_file)
    svg, speedscope = str(tmp_path / "p.svg"), str(tmp_path / "c.json")
    try:
        proc = run_cli("profile", "partition", "busy/0", "--duration", "2", "--rate", "200",
                       "--output", svg, "--data-dir", broker.data_dir, timeout=120)
    finally:
        stop_producer(producer, stop_file)
    assert proc.returncode == 0, proc.stderr
    assert "wrote flamegraph of partition busy/0" in proc.stdout and svg in proc.stdout
    with open(svg) as f:
        graph = f.read()
    assert graph.lstrip().startswith("<?xml") and "<svg" in graph
    # Frames of the partition process's own code: its loop and the drain of the rings.
    assert "shmbroker/partition/" in graph, graph[:2000]
    # The coordinator idles on its poller; --idle shows it, in speedscope's JSON.
    proc = run_cli("profile", "coordinator", "--duration", "1", "--idle", "--format",
                   "speedscope", "-o", speedscope, "--data-dir", broker.data_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(speedscope) as f:
        doc = json.load(f)
    files = {frame.get("file", "") for frame in doc["shared"]["frames"]}
    assert any("shmbroker/coordinator/" in name for name in files), sorted(files)


def test_profile_of_an_unknown_or_absent_target_says_which_exist(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("busy", 2)
    broker.wait_running({("busy", 0), ("busy", 1)})
    cases = {
        ("partition", "busy/7"): "no partition busy/7 is served on data dir "
                                 f"{broker.data_dir} (served: busy/0, busy/1)",
        ("router",): "no router is running",
        ("bogus",): "unknown target 'bogus': expected `partition TOPIC/N`",
        (str(2 ** 22 + 12345),): f"no process with pid {2 ** 22 + 12345} is running",
    }
    for target, message in cases.items():
        proc = run_cli("profile", *target, "--duration", "1", "--data-dir", broker.data_dir,
                       timeout=60)
        assert proc.returncode == profile.EXIT_TARGET == 1, (target, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_profile_without_a_broker_says_so(broker_dir):
    proc = run_cli("profile", "coordinator", "--data-dir", broker_dir, timeout=60)
    assert proc.returncode == 1 and "no broker is running" in proc.stderr


@needs_py_spy
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv, to profile without CAP_SYS_PTRACE another "
                           "user's process")
def test_profile_without_ptrace_permission_says_how_to_get_it(broker_dir):
    """Root without CAP_SYS_PTRACE may not read the memory of another user's process: the
    same refusal an operator meets without the right to ptrace the broker."""
    target = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "sleep", "60"])
    try:
        proc = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-m",
                               "shmbroker", "profile", str(target.pid), "--duration", "1",
                               "--data-dir", broker_dir], capture_output=True, text=True,
                              timeout=60)
    finally:
        target.kill()
        target.wait(timeout=WAIT_S_MAX)
    assert proc.returncode == profile.EXIT_PERMISSION, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"pid {target.pid}" in line and "ptrace" in line
    assert "sudo" in line and "kernel.yama.ptrace_scope=0" in line and "CAP_SYS_PTRACE" in line


def test_profile_without_py_spy_says_how_to_install_it(broker, tmp_path):
    """A Python with shmbroker but no py-spy beside it nor on PATH (the base interpreter of
    our virtualenv, given our packages by PYTHONPATH)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(shmbroker.__file__)))
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(base)
    env = dict(os.environ, PATH="/usr/bin:/bin",
               PYTHONPATH=os.pathsep.join([repo, *site.getsitepackages()]))
    if shutil.which("py-spy", path=env["PATH"]) or \
            os.path.exists(os.path.join(os.path.dirname(base), "py-spy")):
        pytest.skip("py-spy is installed system-wide here")
    proc = subprocess.run([str(bare / "python"), "-m", "shmbroker", "profile", "coordinator",
                           "--data-dir", broker.data_dir], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == profile.EXIT_NO_PY_SPY, proc.stderr
    assert "py-spy is not installed: `pip install py-spy`" in proc.stderr
