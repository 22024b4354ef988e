"""The metrics process (``shmbroker: metrics``): a Prometheus text endpoint, ``GET /metrics``.

Started by the supervisor when `serve` has ``--metrics-listen HOST:PORT`` (restarted if it
dies, like every child), run as ``python -m shmbroker.monitor.metrics_server``. Each scrape is
one :meth:`Monitor.sample` (the counters regions and control regions mapped read-only, the
partition directories, psutil, and the coordinator's groups through ``Admin``, as `shmbroker
top` does) rendered by prometheus.py. The standard library's ``http.server``, one request at a
time (a scrape every few seconds needs no more; Monitor is single-threaded), every
connection bounded by ``METRICS_CONNECTION_TIMEOUT_S``.

Loopback only unless ``--allow-remote``: the endpoint has no authentication and shows topic
and group names.
"""
from __future__ import annotations

import argparse
import http.server
import logging
import select
import socket
import sys

from .. import errors
from ..broker import lifecycle
from ..broker.listen_address import parse_host_port
from ..broker.naming import process_title

log = logging.getLogger("shmbroker.metrics")

#: A client that sends or reads nothing for this long is dropped.
METRICS_CONNECTION_TIMEOUT_S = 5.0
DEFAULT_METRICS_PORT = 9644


def parse_listen(listen: str, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9644`` for IPv6; port 0: any free one) -> (host, port).
    ConfigError for anything else, and for a non-loopback host unless ``allow_remote``."""
    host, port, loopback = parse_host_port(listen, "--metrics-listen",
                                           f"127.0.0.1:{DEFAULT_METRICS_PORT}")
    if not loopback and not allow_remote:
        raise errors.ConfigError(
            f"--metrics-listen {listen!r}: only loopback addresses (127.0.0.1, ::1, localhost) "
            f"unless --metrics-allow-remote: the endpoint has no authentication")
    return host, port


class _Server(http.server.HTTPServer):
    def __init__(self, address: tuple[str, int], monitor):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        self.monitor = monitor
        self.scrapes = 0
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = METRICS_CONNECTION_TIMEOUT_S
    server_version = "shmbroker-metrics"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        from .prometheus import CONTENT_TYPE, render

        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "text/plain; charset=utf-8", b"try /metrics\n")
            return
        server: _Server = self.server  # type: ignore[assignment]
        try:
            snap = server.monitor.sample()
        except errors.ShmbrokerError as exc:
            self._reply(503, "text/plain; charset=utf-8", f"{exc}\n".encode())
            return
        for problem in snap.errors:
            log.warning("scrape: %s", problem)
        server.scrapes += 1
        self._reply(200, CONTENT_TYPE, render(snap).encode())

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s " + format, self.address_string(), *args)


def endpoint_of(server: http.server.HTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = lifecycle.child_parser("monitor.metrics_server")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--allow-remote", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = lifecycle.start_child(process_title("metrics"), args.supervisor_pid)
    from .snapshot import Monitor

    monitor = Monitor(args.data_dir)
    try:
        server = _Server(parse_listen(args.listen, args.allow_remote), monitor)
    except (errors.ShmbrokerError, OSError) as exc:
        log.error("metrics endpoint cannot start on %s: %s", args.listen, exc)
        monitor.close()
        return 1
    try:
        log.info("metrics on http://%s/metrics", endpoint_of(server))
        lifecycle.report_ready(args.ready_fd, f"ready {endpoint_of(server)}")
        while not stop.requested:  # the process main loop: unbounded by design
            readable, _, _ = select.select([server.fileno(), stop.read_fd], [], [])
            if server.fileno() in readable and not stop.requested:
                server._handle_request_noblock()
    finally:
        server.server_close()
        monitor.close()
    log.info("metrics stopped after %d scrape(s)", server.scrapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
