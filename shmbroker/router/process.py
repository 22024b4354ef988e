"""The router process: lifecycle wiring around RouterServer (as coordinator/process.py)."""
from __future__ import annotations

import argparse
import logging
import sys

from .. import errors
from ..broker import lifecycle
from ..broker.naming import process_title
from ..config import COLD_READ_HOT_WINDOW_BYTES_DEFAULT

log = logging.getLogger("shmbroker.router")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = lifecycle.child_parser("router")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--hot-window-bytes", type=int,
                        default=COLD_READ_HOT_WINDOW_BYTES_DEFAULT)
    # Paths, not keys, on the command line: argv is readable by every user of the host.
    parser.add_argument("--curve-server-secret-key-file", default=None)
    parser.add_argument("--curve-allowed-clients-dir", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = lifecycle.start_child(process_title("router"), args.supervisor_pid)
    from .auth import load_server_keys
    from .server import RouterServer  # after naming: zmq starts threads on first use

    try:
        curve = None
        if args.curve_server_secret_key_file is not None:
            curve = load_server_keys(args.curve_server_secret_key_file,
                                     args.curve_allowed_clients_dir)
        server = RouterServer(args.data_dir, args.listen, curve,
                              hot_window_bytes=args.hot_window_bytes)
    except errors.ShmbrokerError as exc:
        log.error("router cannot start: %s", exc)
        return 1
    try:
        log.info("router listening on %s%s; cold reads on %s:%d (hot window %d bytes)",
                 server.endpoint,
                 f" (CURVE: {len(server.auth.allow.keys)} client key(s) allowed in "
                 f"{server.auth.allow.directory})" if server.auth is not None else
                 " (no authentication: loopback only)",
                 server.cold.host, server.cold.port, server.cold.hot_window_bytes)
        # The supervisor records the bound address (a '*' port resolved) in runtime.json.
        lifecycle.report_ready(args.ready_fd, f"ready {server.endpoint}")
        server.serve(stop.read_fd, lambda: stop.requested)
    finally:
        server.close()
    log.info("router stopped (%d forwarded, %d refused, %d replies undeliverable)",
             server.forwarded, server.refused, server.replies_undeliverable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
