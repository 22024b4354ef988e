"""The coordinator process: lifecycle wiring around CoordinatorServer."""
from __future__ import annotations

import argparse
import logging
import socket
import sys

from .. import errors
from ..broker import lifecycle
from ..broker.naming import process_title

log = logging.getLogger("shmbroker.coordinator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = lifecycle.child_parser("coordinator")
    parser.add_argument("--supervisor-fd", type=int, default=None,
                        help="SOCK_SEQPACKET link to the supervisor (topic change notices)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = lifecycle.start_child(process_title("coordinator"), args.supervisor_pid)
    from .server import CoordinatorServer  # after naming: zmq starts threads on first use

    link = None
    if args.supervisor_fd is not None:
        link = socket.socket(fileno=args.supervisor_fd)
        link.setblocking(False)
    try:
        server = CoordinatorServer(args.data_dir, link)
    except errors.ShmbrokerError as exc:
        log.error("coordinator cannot start: %s", exc)
        return 1
    try:
        log.info("coordinator serving %s (%d topic(s))", server.endpoint, len(server.registry.topics))
        lifecycle.report_ready(args.ready_fd)
        server.serve(stop.read_fd, lambda: stop.requested)
    finally:
        server.close()
    log.info("coordinator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
