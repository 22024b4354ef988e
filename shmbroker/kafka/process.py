"""The kafka process (``python -m shmbroker.kafka``, title ``shmbroker: kafka``): lifecycle
wiring around KafkaServer, as router/process.py is around RouterServer."""
from __future__ import annotations

import logging
import sys

from .. import errors
from ..broker import lifecycle
from ..broker.naming import process_title

log = logging.getLogger("shmbroker.kafka")


def main(argv: list[str] | None = None) -> int:
    parser = lifecycle.child_parser("kafka")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    stop = lifecycle.start_child(process_title("kafka"), args.supervisor_pid)
    from .server import KafkaServer  # after naming: zmq (admin) starts threads on first use

    try:
        server = KafkaServer(args.data_dir, args.listen)
    except errors.ShmbrokerError as exc:
        log.error("kafka listener cannot start: %s", exc)
        return 1
    try:
        log.info("kafka listener on %s (classic protocol; no authentication: loopback only)",
                 server.endpoint)
        # The supervisor records the bound address (port 0 resolved) in runtime.json.
        lifecycle.report_ready(args.ready_fd, f"ready {server.endpoint}")
        server.serve(stop.read_fd, lambda: stop.requested)
    finally:
        server.close()
    # The only place the listener's counters are seen for now (tests read this line).
    log.info("kafka listener stopped (%d requests, %d connections closed for errors; fetch "
             "record bytes: %d sent with sendfile, %d copied from the mapping; produce "
             "batches: %d of %d written from the receive buffer without a copy)",
             server.requests, server.refused, server.sendfile_bytes, server.record_bytes_copied,
             server.produce.in_place, server.produce.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
