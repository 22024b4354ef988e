"""The `shmbroker` command line (also `python -m shmbroker`).

Each subcommand is a small function that parses nothing itself; argparse does that. Errors of
ours (``shmbroker.errors``) are printed as one line and exit 1; a traceback reaches the user
only for a bug, never for bad input.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__, errors
from .config import default_data_dir


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.data_dir, out=sys.stdout, records_total=args.records)


def _cmd_dump_log(args: argparse.Namespace) -> int:
    from .log.dump import dump_log

    return dump_log(args.paths, out=sys.stdout, verify=args.verify,
                    print_records=not args.no_records, records_max=args.max_records)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbroker",
        description="Kafka's design rebuilt for one large host: a durable, replayable log "
                    "served from the page cache and shared memory.")
    parser.add_argument("--version", action="version", version=f"shmbroker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="write a partition log, read it back, and print what happened",
        description="A short demo of the partition log (the broker itself arrives in a later "
                    "release): appends batches, rolls segments, reads back and looks up by time.")
    demo.add_argument("--data-dir", default=default_data_dir(),
                      help="where to put the demo log (default: $SHMBROKER_DATA_DIR or "
                           "~/.local/share/shmbroker)")
    demo.add_argument("--records", type=int, default=200_000, help="records to write (default 200000)")
    demo.set_defaults(func=_cmd_demo)

    dump = sub.add_parser(
        "dump-log", help="print the batches and records of segment files (like kafka-dump-log)",
        description="Prints .log, .index and .timeindex files. With --verify, exits non-zero "
                    "on any corruption and names the file and byte position.")
    dump.add_argument("paths", nargs="+", metavar="PATH", help="segment files or partition directories")
    dump.add_argument("--verify", action="store_true", help="check every batch; exit 1 on corruption")
    dump.add_argument("--no-records", action="store_true", help="print batch headers only")
    dump.add_argument("--max-records", type=int, default=None, help="stop printing records after N")
    dump.set_defaults(func=_cmd_dump_log)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except errors.ShmbrokerError as exc:
        print(f"shmbroker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shmbroker dump-log ... | head` closes our stdout early; that is not an error.
        return 0


if __name__ == "__main__":
    sys.exit(main())
