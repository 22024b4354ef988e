"""The supervisor: the `shmbroker serve` process (docs/design/broker.md).

It starts the coordinator, the router (unless ``--listen none``), the metrics endpoint (with
``--metrics-listen``), and one process per partition as fresh interpreters
(``sys.executable -m shmbroker.partition ...``; never a fork of a process that may have
threads), waits on them without polling (a pidfd per child, its ready pipe, the coordinator's
link and the signal self-pipe, all in one selector; an idle broker sleeps in ``select``),
restarts a dead child (at once, then with back-off if it keeps dying), starts and stops
partition processes when the coordinator reports a topic change, and keeps the runtime file.
On SIGTERM or SIGINT it stops every child with SIGTERM, SIGKILLs those that outlive
``child_stop_timeout_ms``, removes its runtime state and returns 0.

Owned by the supervisor process's main thread; single-threaded by design.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..config import BrokerConfig
from ..coordinator.address import endpoint, socket_path
from ..coordinator.topics import TopicRegistry, expected_partitions, load_topics, partition_dir
from ..errors import STORAGE_ERRNOS, ShmbrokerError
from ..log import files
from ..shm import names
from . import shm_regions
from .listen_address import try_bind
from . import runtime
from .backoff import RestartBackoff
from .lock import BrokerLock
from .naming import process_title

log = logging.getLogger("shmbroker.supervisor")

STARTING, RUNNING, STOPPING, RESTARTING = "starting", "running", "stopping", "restarting"
COORDINATOR = ("coordinator",)
ROUTER = ("router",)
METRICS = ("metrics",)
KAFKA = ("kafka",)
#: Children that are not partitions: never stopped by a topic change.
_SERVICES = (COORDINATOR, ROUTER, METRICS, KAFKA)
#: Bytes read from a ready pipe or the link per wake-up (their messages are a few bytes).
_PIPE_READ_BYTES_MAX = 4096


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(eq=False)
class Child:
    """One supervised process (or its slot while it waits for a restart)."""

    key: tuple
    backoff: RestartBackoff
    proc: subprocess.Popen | None = None
    pidfd: int | None = None
    ready_fd: int | None = None
    link: socket.socket | None = None  # coordinator only
    state: str = STARTING
    wanted: bool = True
    started_ms: int = 0
    started_at: float = 0.0
    deadline_ms: int | None = None  # STOPPING: SIGKILL at; RESTARTING: start at
    killed: bool = False

    @property
    def role(self) -> str:
        return self.key[0]

    @property
    def title(self) -> str:
        return process_title(*self.key)

    @property
    def name(self) -> str:
        return self.title.removeprefix("shmbroker: ")


class Supervisor:
    def __init__(self, data_dir: str, lock: BrokerLock, config: BrokerConfig = BrokerConfig()):
        self.data_dir = os.path.abspath(data_dir)
        self.lock = lock
        self.config = config
        self.endpoint = endpoint(self.data_dir)
        self.registry: TopicRegistry = load_topics(self.data_dir)  # a bad file stops us here
        self.selector = selectors.DefaultSelector()
        self.children: dict[tuple, Child] = {}
        self.stopping = False
        self.shutdown_deadline_ms: int | None = None
        self.pending_ack = 0
        self.started_at = time.time()
        self._signals = 0
        self._signals_handled = 0
        self._dirty = True
        self._runtime_unwritten = False  # the last runtime.json write was refused (disk full)
        self._announced_ready = False
        #: The router's bound address (its port resolved), from its ready line.
        self.router_endpoint: str | None = None
        #: The metrics endpoint's bound HOST:PORT (port 0 resolved), from its ready line.
        self.metrics_endpoint: str | None = None
        #: The Kafka listener's bound HOST:PORT (port 0 resolved), from its ready line.
        self.kafka_endpoint: str | None = None
        #: One control region per wanted partition, created before its first process starts
        #: and kept across its restarts; unlinked when the partition stops for good.
        self.controls = shm_regions.ControlRegions(names.broker_prefix(self.data_dir))
        #: One counters region per child (not the metrics server), created before its first
        #: start and kept across its restarts.
        self.counters = shm_regions.CountersRegions(names.broker_prefix(self.data_dir))
        self._next_sweep_ms = 0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """The process main loop: unbounded by design, until a signal asks it to stop; then
        bounded by ``child_stop_timeout_ms`` (twice, for SIGTERM and then SIGKILL)."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(wake_r, selectors.EVENT_READ, self._on_signal_pipe)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self.controls.reclaim_stale(expected_partitions(self.registry))
            self._start(COORDINATOR)
            if self.config.listen is not None:
                self._start(ROUTER)
            if self.config.metrics_listen is not None:
                self._start(METRICS)
            if self.config.kafka_listen is not None:
                self._start(KAFKA)
            self._reconcile()
            while not (self.stopping and not self.children):
                self._write_runtime()
                now = monotonic_ms()
                if self.shutdown_deadline_ms is not None and now >= self.shutdown_deadline_ms:
                    log.error("children %s did not exit even after SIGKILL; giving up on them",
                              [c.name for c in self.children.values()])
                    return 1
                for key, _ in self.selector.select(self._timeout_s(now)):
                    # An earlier handler of this round may have unregistered (and closed) this
                    # fd, e.g. a coordinator's exit closes its link; its fd number may even be
                    # reused by a new registration already. Only a key still registered counts.
                    if self.selector.get_map().get(key.fd) is key:
                        key.data(key.fileobj)
                self._handle_signals()
                self._run_timers(monotonic_ms())
                self._maybe_sweep(monotonic_ms())
                self._maybe_ack()
            log.info("all processes stopped; broker on %s is down", self.data_dir)
            kept = shm_regions.rings_kept(self.controls.prefix)
            if kept:
                log.warning("%d ring(s) of dead producers still hold frames that are not in the "
                            "log (a partition process was killed before it drained them); "
                            "kept for the next start on %s, which appends them: %s",
                            len(kept), self.data_dir, ", ".join(kept))
            return 0
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self.controls.close_all()
            self.counters.close_all()
            shm_regions.sweep_consumer_counters(self.counters.prefix, everything=True)
            self.selector.close()
            os.close(wake_r)
            os.close(wake_w)

    def _maybe_sweep(self, now: int) -> None:
        if now >= self._next_sweep_ms:
            self._next_sweep_ms = now + self.config.consumer_counters_sweep_ms
            shm_regions.sweep_consumer_counters(self.counters.prefix)

    def _timeout_s(self, now: int) -> float | None:
        deadlines = [c.deadline_ms for c in self.children.values() if c.deadline_ms is not None]
        deadlines.append(self._next_sweep_ms)
        if self.shutdown_deadline_ms is not None:
            deadlines.append(self.shutdown_deadline_ms)
        if not deadlines:  # (never empty now: the consumer-counters sweep is periodic)
            return None  # nothing scheduled: sleep until a child, the link or a signal speaks
        return max(0, min(deadlines) - now) / 1000

    def _run_timers(self, now: int) -> None:
        for child in list(self.children.values()):
            if child.deadline_ms is None or child.deadline_ms > now:
                continue
            if child.state == RESTARTING:
                self._start(child.key)
            elif child.state == STOPPING and not child.killed:
                log.warning("%s (pid %d) ignored SIGTERM for %d ms; sending SIGKILL", child.name,
                            child.proc.pid, self.config.child_stop_timeout_ms)
                self._kill(child)

    # -- signals ----------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signals += 1

    def _on_signal_pipe(self, fd: int) -> None:
        try:
            os.read(fd, _PIPE_READ_BYTES_MAX)
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        if self._signals == self._signals_handled:
            return
        first = self._signals_handled == 0
        self._signals_handled = self._signals
        if first:
            self.shutdown()
        else:
            log.warning("second stop signal: killing every child now")
            for child in self.children.values():
                if child.proc is not None and not child.killed:
                    self._kill(child)

    def shutdown(self) -> None:
        log.info("stopping: SIGTERM to %d process(es)", len(self.children))
        self.stopping = True
        self._dirty = True
        self.shutdown_deadline_ms = monotonic_ms() + 2 * self.config.child_stop_timeout_ms + 1000
        for child in list(self.children.values()):
            self._stop(child)

    # -- starting, stopping, exits ---------------------------------------------------------------

    def _argv(self, child: Child, ready_fd: int, link_fd: int | None) -> list[str]:
        common = ["--data-dir", self.data_dir, "--supervisor-pid", str(os.getpid()),
                  "--ready-fd", str(ready_fd)]
        if child.role == "coordinator":
            return [sys.executable, "-m", "shmbroker.coordinator", *common,
                    "--supervisor-fd", str(link_fd)]
        if child.role == "router":
            assert self.config.listen is not None
            # A restarted router binds the port its first run got, so clients reconnect.
            curve = []
            if self.config.curve:
                curve = ["--curve-server-secret-key-file",
                         os.path.abspath(self.config.curve_server_secret_key_file),
                         "--curve-allowed-clients-dir",
                         os.path.abspath(self.config.curve_allowed_clients_dir)]
            return [sys.executable, "-m", "shmbroker.router", *common,
                    "--listen", self.router_endpoint or self.config.listen,
                    "--hot-window-bytes", str(self.config.hot_window_bytes), *curve]
        if child.role == "metrics":
            assert self.config.metrics_listen is not None
            # A restarted metrics process binds the port its first run got (scrape configs).
            return [sys.executable, "-m", "shmbroker.monitor.metrics_server", *common,
                    "--listen", self.metrics_endpoint or self.config.metrics_listen,
                    *(["--allow-remote"] if self.config.metrics_allow_remote else [])]
        if child.role == "kafka":
            assert self.config.kafka_listen is not None
            # A restarted listener binds the port its first run got: clients reconnect to the
            # address Metadata gave them.
            return [sys.executable, "-m", "shmbroker.kafka", *common,
                    "--listen", self.kafka_endpoint or self.config.kafka_listen]
        _, topic, partition = child.key
        return [sys.executable, "-m", "shmbroker.partition", *common, "--topic", topic,
                "--partition", str(partition), "--spin-us", str(self.config.partition_spin_us)]

    def _start(self, key: tuple) -> None:
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = Child(key, RestartBackoff(self.config))
        try:
            if child.role == "partition":
                self.controls.ensure(child.key[1], child.key[2])
            self.counters.ensure(child.key)
        except ShmbrokerError as exc:
            log.error("cannot create the shared memory of %s: %s", child.name, exc)
            child.started_ms = monotonic_ms()  # counts as a failed start (back-off)
            self._schedule_restart(child, child.started_ms)
            return
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        link_parent = link_child = None
        if key == COORDINATOR:
            link_parent, link_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pass_fds = [ready_w, self.lock.fd] + ([link_child.fileno()] if link_child else [])
        child.started_ms, child.started_at = monotonic_ms(), time.time()
        try:
            proc = subprocess.Popen(
                self._argv(child, ready_w, link_child.fileno() if link_child else None),
                pass_fds=pass_fds, stdin=subprocess.DEVNULL, close_fds=True)
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            log.error("cannot start %s: %s", child.name, exc)
            for fd in (ready_r, ready_w):
                os.close(fd)
            if link_parent is not None:
                link_parent.close()
                link_child.close()
            self._schedule_restart(child, monotonic_ms())
            return
        finally:
            if link_child is not None:
                link_child.close()
        os.close(ready_w)
        child.proc, child.pidfd, child.ready_fd, child.link = proc, pidfd, ready_r, link_parent
        child.state, child.deadline_ms, child.killed = STARTING, None, False
        self.selector.register(pidfd, selectors.EVENT_READ, lambda _fd, c=child: self._on_exit(c))
        self.selector.register(ready_r, selectors.EVENT_READ, lambda _fd, c=child: self._on_ready(c))
        if link_parent is not None:
            link_parent.setblocking(False)
            self.selector.register(link_parent, selectors.EVENT_READ, self._on_link)
            self.pending_ack = 0  # a new coordinator counts its changes from 1
        self._dirty = True
        log.info("started %s (pid %d)", child.name, proc.pid)

    def _on_ready(self, child: Child) -> None:
        assert child.ready_fd is not None
        data = os.read(child.ready_fd, _PIPE_READ_BYTES_MAX)
        self.selector.unregister(child.ready_fd)
        os.close(child.ready_fd)
        child.ready_fd = None
        if data.startswith(b"ready") and child.state == STARTING:
            if child.key == ROUTER:
                self.router_endpoint = data.decode(errors="replace").split()[-1]
            elif child.key == METRICS:
                self.metrics_endpoint = data.decode(errors="replace").split()[-1]
            elif child.key == KAFKA:
                self.kafka_endpoint = data.decode(errors="replace").split()[-1]
            child.state = RUNNING
            self._dirty = True
            log.info("%s (pid %d) is up (%s)", child.name, child.proc.pid,
                     data.decode(errors="replace").strip())

    def _stop(self, child: Child) -> None:
        child.wanted = False
        if child.proc is None:  # waiting for a restart: nothing runs
            del self.children[child.key]
            self._forget(child)
        elif child.state != STOPPING:
            child.state = STOPPING
            child.deadline_ms = monotonic_ms() + self.config.child_stop_timeout_ms
            self._signal(child, signal.SIGTERM)
        self._dirty = True

    def _kill(self, child: Child) -> None:
        child.killed = True
        child.deadline_ms = None
        self._signal(child, signal.SIGKILL)

    def _signal(self, child: Child, signum: int) -> None:
        try:
            signal.pidfd_send_signal(child.pidfd, signum)
        except ProcessLookupError:
            pass  # already exited; its pidfd event comes next

    def _on_exit(self, child: Child) -> None:
        status = child.proc.wait()
        pid = child.proc.pid
        self._close_fds(child)
        child.proc = None
        self._dirty = True
        now = monotonic_ms()
        if not child.wanted or self.stopping:
            log.info("%s (pid %d) stopped with status %d", child.name, pid, status)
            del self.children[child.key]
            self._forget(child)
            return
        log.warning("%s (pid %d) died with status %d after %d ms", child.name, pid, status,
                    now - child.started_ms)
        self._schedule_restart(child, now)

    def _forget(self, child: Child) -> None:
        """A partition that stopped for good (clean stop, topic deleted): its control region
        goes. Producers still mapping it see the partition's status STOPPED."""
        if child.role == "partition":
            self.controls.remove(child.key[1], child.key[2])
            self.counters.remove(child.key)

    def _schedule_restart(self, child: Child, now: int) -> None:
        delay = child.backoff.delay_ms(min(child.started_ms, now), now)
        child.state = RESTARTING
        if delay == 0:
            self._start(child.key)
            return
        log.warning("%s keeps dying; restarting in %d ms", child.name, delay)
        child.deadline_ms = now + delay

    def _close_fds(self, child: Child) -> None:
        for fd in (child.pidfd, child.ready_fd):
            if fd is not None:
                self.selector.unregister(fd)
                os.close(fd)
        child.pidfd = child.ready_fd = None
        if child.link is not None:
            self.selector.unregister(child.link)
            child.link.close()
            child.link = None

    # -- topic changes ---------------------------------------------------------------------------

    def _on_link(self, link: socket.socket) -> None:
        try:
            message = link.recv(_PIPE_READ_BYTES_MAX)
        except BlockingIOError:
            return
        if not message:
            return  # the coordinator is exiting; its pidfd reports the exit
        kind, _, seq = message.partition(b" ")
        if kind != b"changed" or not seq.isdigit():
            log.error("unexpected message from the coordinator: %r", message[:100])
            return
        try:
            self.registry = load_topics(self.data_dir)
        except ShmbrokerError as exc:
            log.error("cannot read topics after change %s: %s", seq.decode(), exc)
            return
        self._reconcile()
        self.pending_ack = max(self.pending_ack, int(seq))

    def _reconcile(self) -> None:
        """Start a process for every partition in the registry; stop the others."""
        if self.stopping:
            return
        wanted = {("partition", topic, p) for topic, p in expected_partitions(self.registry)}
        for key in sorted(wanted):
            child = self.children.get(key)
            if child is None:
                self._start(key)
            elif not child.wanted:
                child.wanted = True  # stopping for an old change: restarted when it exits
        for key, child in list(self.children.items()):
            if key not in _SERVICES and key not in wanted and child.wanted:
                log.info("stopping %s: no longer in the topic metadata", child.name)
                self._stop(child)

    def _maybe_ack(self) -> None:
        """Confirm a topic change once every new partition is up and every old one is gone."""
        coordinator = self.children.get(COORDINATOR)
        if not self.pending_ack or coordinator is None or coordinator.link is None:
            return
        for child in self.children.values():
            if child.key not in _SERVICES and (not child.wanted or child.state == STARTING):
                return
        try:
            coordinator.link.send(b"done %d" % self.pending_ack)
        except OSError as exc:
            log.warning("cannot confirm change %d to the coordinator: %s", self.pending_ack, exc)
        self.pending_ack = 0

    # -- runtime file ----------------------------------------------------------------------------

    def _write_runtime(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        children = sorted(self.children.values(), key=lambda c: (c.role == "partition", c.key))
        all_up = bool(children) and all(c.state == RUNNING for c in children)
        state = "stopping" if self.stopping else ("running" if all_up else "starting")
        processes: list[dict[str, Any]] = [{
            "role": "supervisor", "pid": os.getpid(), "started_at": self.started_at,
            "state": "stopping" if self.stopping else "running",
            "title": process_title("supervisor")}]
        for child in children:
            entry: dict[str, Any] = {
                "role": child.role, "pid": child.proc.pid if child.proc else None,
                "started_at": child.started_at, "state": child.state,
                "restarts": child.backoff.restarts, "title": child.title}
            if child.role == "partition":
                entry.update(topic=child.key[1], partition=child.key[2],
                             directory=partition_dir(self.data_dir, child.key[1], child.key[2]))
            processes.append(entry)
        try:
            runtime.write_runtime(self.data_dir, state, self.endpoint, processes,
                                  self.router_endpoint, self.metrics_endpoint,
                                  self.kafka_endpoint)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            # A full (or read-only) disk must not take the broker down: runtime.json only
            # describes it. Written again at the next loop turn (the sweep wakes it).
            self._dirty = True
            if not self._runtime_unwritten:
                log.error("cannot write %s: %s; the broker goes on, the file is stale until "
                          "there is room", runtime.runtime_path(self.data_dir), exc)
            self._runtime_unwritten = True
            return
        if self._runtime_unwritten:
            log.info("%s written again", runtime.runtime_path(self.data_dir))
            self._runtime_unwritten = False
        if state == "running" and not self._announced_ready:
            self._announced_ready = True
            log.info("broker ready on %s: coordinator%s + %d partition process(es)",
                     self.data_dir, f", router on {self.router_endpoint}"
                     if self.router_endpoint else "",
                     sum(c.role == "partition" for c in children))


def check_router_settings(config: BrokerConfig) -> None:
    """The router's address and keys, checked before anything starts (ConfigError): a
    well-formed address, non-loopback only with CURVE, key files that load (and a secret key
    not readable by others), an allow-list directory with keys in it."""
    if config.kafka_listen is not None:
        from ..kafka.server import parse_kafka_listen
        parse_kafka_listen(config.kafka_listen)
    if config.listen is None:
        return  # no router: nothing of it to import (ZeroMQ, its server) or check
    from ..router.auth import load_server_keys
    from ..router.server import check_listen_address

    check_listen_address(config.listen, config.curve)
    if config.curve:
        load_server_keys(config.curve_server_secret_key_file, config.curve_allowed_clients_dir)


def _check_listen(listen: str) -> None:
    """A taken ``--listen`` stops `serve` with a clear error before anything starts (rather
    than a router that keeps failing to bind): a trial bind, closed at once."""
    import zmq

    if listen.rsplit(":", 1)[-1] == "*":
        return
    trial = zmq.Context.instance().socket(zmq.ROUTER)
    trial.setsockopt(zmq.LINGER, 0)
    try:
        trial.bind(listen)
    except zmq.ZMQError as exc:
        raise ShmbrokerError(f"--listen {listen}: cannot bind ({exc.strerror}); is another "
                             f"broker listening there? pass another --listen (or --listen "
                             f"none: no router)") from None
    finally:
        trial.close(linger=0)


def _check_metrics_listen(listen: str, allow_remote: bool) -> None:
    """As _check_listen, for ``--metrics-listen``: a bad, remote (unless allowed) or taken
    address stops `serve` before anything starts."""
    from ..monitor.metrics_server import parse_listen

    host, port = parse_listen(listen, allow_remote)
    try_bind(host, port, "--metrics-listen", listen, "serving metrics")


def _check_kafka_listen(listen: str) -> None:
    """As _check_listen, for ``--kafka-listen``: a taken port stops `serve` before anything
    starts (the address itself was checked by check_router_settings)."""
    from ..kafka.server import parse_kafka_listen

    host, port = parse_kafka_listen(listen)
    try_bind(host, port, "--kafka-listen", listen, "listening")


def serve(data_dir: str, config: BrokerConfig = BrokerConfig()) -> int:
    """`shmbroker serve`: take the lock, supervise until stopped, clean up. Returns the exit status."""
    from .lifecycle import configure_logging
    from .naming import name_this_process

    data_dir = os.path.abspath(data_dir)
    endpoint(data_dir)  # a data dir too deep for a Unix socket fails before anything starts
    check_router_settings(config)
    if config.listen is not None:
        _check_listen(config.listen)
    if config.metrics_listen is not None:
        _check_metrics_listen(config.metrics_listen, config.metrics_allow_remote)
    if config.kafka_listen is not None:
        _check_kafka_listen(config.kafka_listen)
    name_this_process(process_title("supervisor"))
    configure_logging()
    files.make_dir(data_dir)
    lock = BrokerLock.acquire(data_dir, config.lock_wait_ms)
    try:
        supervisor = Supervisor(data_dir, lock, config)
        log.info("supervisor (pid %d) serving %s", os.getpid(), data_dir)
        return supervisor.run()
    finally:
        runtime.remove_runtime(data_dir)
        files.remove_files([socket_path(data_dir)], sync_dir=False)
        lock.release()
