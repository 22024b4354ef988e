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
from .config import COLD_READ_HOT_WINDOW_BYTES_DEFAULT, ROUTER_LISTEN_DEFAULT, default_data_dir


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_broker_demo, run_log_demo

    run = run_log_demo if args.log_only else run_broker_demo
    return run(args.data_dir, out=sys.stdout, records_total=args.records)


def _cmd_dump_log(args: argparse.Namespace) -> int:
    from .log.dump import dump_log

    return dump_log(args.paths, out=sys.stdout, verify=args.verify,
                    print_records=not args.no_records, records_max=args.max_records)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .broker.config_file import SERVE_FILE_ENTRIES, serve_settings
    from .broker.supervisor import check_router_settings, serve

    try:
        data_dir, config = serve_settings({name: getattr(args, name)
                                           for name in SERVE_FILE_ENTRIES}, args.config)
        check_router_settings(config)
    except errors.ConfigError as exc:  # a usage error, as argparse's own (exit 2)
        print(f"shmbroker: error: {exc}", file=sys.stderr)
        return 2
    return serve(data_dir, config)


def _cmd_keys(args: argparse.Namespace) -> int:
    import os
    import stat

    from .keys import generate

    public_path, secret_path, public_key = generate(args.out, args.name, args.force)
    mode = stat.S_IMODE(os.stat(args.out).st_mode)
    if mode & 0o077:
        print(f"shmbroker: warning: {args.out} has mode {mode:04o}: other users can list it "
              f"(the secret key file itself is 0600)", file=sys.stderr)
    print(f"public key  {public_path}  (hand it out: the server's to clients, a client's to "
          f"the broker's curve_allowed_clients_dir)")
    print(f"secret key  {secret_path}  (mode 0600; keep it on this host)")
    print(f"public key (Z85): {public_key.decode()}")
    return 0


def _add_keys_command(sub) -> None:
    keys = sub.add_parser(
        "keys", help="CURVE key pairs for the router and its remote clients",
        description="Key pairs in ZeroMQ's certificate format (pyzmq's zmq.auth files).")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = ksub.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret (mode 0600) into DIR",
        description="Writes a new CURVE key pair: DIR/NAME.key, the public key (0644), and "
                    "DIR/NAME.key_secret, both keys (0600). DIR is created 0700 if missing. "
                    "For the broker: give `serve` the server's .key_secret "
                    "(--curve-server-secret-key-file) and its .key to clients "
                    "(curve_server_key=). For a client: copy its .key into the broker's "
                    "--curve-allowed-clients-dir, and use its .key_secret "
                    "(curve_secret_key_file=).")
    gen.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    gen.add_argument("--name", default="server",
                     help="file name (and the name the router logs for a client); default "
                          "server")
    gen.add_argument("--force", action="store_true",
                     help="replace NAME.key and NAME.key_secret if they exist")
    keys.set_defaults(func=_cmd_keys)


def _parse_config(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    config = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise errors.ConfigError(f"--config expects key=value, got {pair!r}")
        config[name.strip()] = value.strip()
    return config


def _print_topic(topic, out) -> None:
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(topic.overrides.items())) or "(defaults)"
    print(f"Topic: {topic.name}\tTopicId: {topic.topic_id}\tPartitionCount: {topic.partitions}"
          f"\tConfigs: {overrides}", file=out)
    for name, value in sorted(topic.config.items()):
        print(f"\t{name}={value}", file=out)


def _cmd_topics(args: argparse.Namespace) -> int:
    from .client.admin import Admin

    with Admin(broker=_broker(args), **_client_options(args)) as admin:
        if args.topics_command == "create":
            topic = admin.create_topic(args.name, args.partitions, _parse_config(args.config))
            print(f"Created topic {topic.name} with {topic.partitions} partition(s).")
        elif args.topics_command == "list":
            for name in admin.list_topics():
                print(name)
        elif args.topics_command == "describe":
            _print_topic(admin.describe_topic(args.name), sys.stdout)
        elif args.topics_command == "delete":
            admin.delete_topic(args.name)
            print(f"Deleted topic {args.name}.")
        elif args.topics_command == "alter":
            topic = admin.alter_partitions(args.name, args.partitions)
            print(f"Topic {topic.name} now has {topic.partitions} partition(s).")
    return 0


def _cmd_groups(args: argparse.Namespace) -> int:
    from .client.admin import Admin

    with Admin(broker=_broker(args), **_client_options(args)) as admin:
        if args.groups_command == "list":
            for group in admin.list_groups():
                print(f"{group['group_id']}\t{group['state']}\tmembers={group['members']}")
        elif args.groups_command == "describe":
            _print_group(admin.describe_group(args.group), sys.stdout)
        elif args.groups_command == "reset-offsets":
            offsets = admin.reset_offsets(args.group, args.topic, _reset_target(args))
            for partition, offset in sorted(offsets.items()):
                print(f"{args.group}\t{args.topic}\t{partition}\t{offset}")
        elif args.groups_command == "delete":
            gone = admin.delete_group(args.group)
            print(f"Deleted group {args.group} ({gone} committed offset(s)).")
    return 0


def _reset_target(args: argparse.Namespace):
    if args.to_earliest:
        return "earliest"
    if args.to_latest:
        return "latest"
    if args.to_offset is not None:
        return args.to_offset
    return _datetime_arg(args.to_datetime, "--to-datetime")


def _datetime_arg(text: str, flag: str):
    """An ISO 8601 date and time (UTC unless it says otherwise), as an aware datetime."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise errors.ConfigError(f"{flag} {text!r} is not an ISO 8601 date and time") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _time_ms_arg(text: str | None, flag: str) -> int | None:
    """``text`` as ms since the epoch: a number of ms, or an ISO 8601 date and time."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    return int(_datetime_arg(text, flag).timestamp() * 1000)


def _print_group(group: dict, out) -> None:
    print(f"Group: {group['group_id']}\tState: {group['state']}\tGeneration: "
          f"{group['generation_id']}\tProtocol: {group['protocol'] or '-'}", file=out)
    print("MEMBER-ID\tCLIENT-ID\tHOST\tPID\tASSIGNMENT", file=out)
    for m in group["members"]:
        owned = ",".join(f"{t}/{p}" for t, p in m.get("assignment") or []) or "-"
        print(f"{m['member_id']}\t{m['client_id']}\t{m['host']}\t{m['pid']}\t{owned}",
              file=out)
    print("TOPIC\tPARTITION\tCOMMITTED\tEND\tLAG", file=out)
    for row in group["partitions"]:
        committed = row["committed"] if row["committed"] >= 0 else "-"
        lag = row["lag"] if row["lag"] is not None else "-"
        print(f"{row['topic']}\t{row['partition']}\t{committed}\t{row['end']}\t{lag}",
              file=out)


def _cmd_top(args: argparse.Namespace) -> int:
    from .monitor.top import INTERVAL_S_MAX, INTERVAL_S_MIN, run

    if not INTERVAL_S_MIN <= args.interval <= INTERVAL_S_MAX:
        raise errors.ConfigError(f"--interval {args.interval}: expected seconds in "
                                 f"[{INTERVAL_S_MIN}, {INTERVAL_S_MAX}]")
    return run(args.data_dir, args.once, args.json, args.interval, plain=args.plain)


def _add_top_command(sub) -> None:
    top = sub.add_parser(
        "top", help="what a live broker is doing: processes, partitions, groups and lag",
        description="Reads runtime.json, the partitions' shared-memory state, their directories "
                    "and the coordinator's groups (read-only; nothing on the data path). On a "
                    "terminal: a full-screen view refreshed every --interval seconds (keys: 1-4 "
                    "view, s sort, / filter, space pause, h help, q quit). Otherwise plain "
                    "snapshots every --interval seconds until Ctrl-C. --once prints one "
                    "snapshot (rates over --interval), --json as JSON.")
    _add_data_dir(top)
    top.add_argument("--once", action="store_true", help="one snapshot, then exit")
    top.add_argument("--json", action="store_true", help="JSON, one object per snapshot")
    top.add_argument("--plain", action="store_true",
                     help="plain text snapshots even on a terminal (no full-screen view)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between samples (default 1)")
    top.set_defaults(func=_cmd_top)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .monitor import profile

    if not profile.DURATION_S_MIN <= args.duration <= profile.DURATION_S_MAX:
        raise errors.ConfigError(f"--duration {args.duration}: expected whole seconds in "
                                 f"[{profile.DURATION_S_MIN}, {profile.DURATION_S_MAX}]")
    if not profile.RATE_HZ_MIN <= args.rate <= profile.RATE_HZ_MAX:
        raise errors.ConfigError(f"--rate {args.rate}: expected samples a second in "
                                 f"[{profile.RATE_HZ_MIN}, {profile.RATE_HZ_MAX}]")
    return profile.run(args.data_dir, args.target, args.duration, args.output, args.format,
                       args.native, args.top, args.rate, args.nonblocking, args.idle)


_PROFILE_EPILOG = """\
examples:
  shmbroker profile partition orders/3 --duration 10      # flame graph SVG in this directory
  shmbroker profile coordinator --format speedscope -o c.json   # open at speedscope.app
  shmbroker profile partition orders/3 --top                # live, like top, per function

exit status: 0 written; 1 no broker, unknown target or target not running; 2 bad arguments;
3 py-spy not installed; 4 no ptrace permission over the target; 5 py-spy failed otherwise.
See docs/profiling.md."""


def _add_profile_command(sub) -> None:
    prof = sub.add_parser(
        "profile", help="profile one broker process with py-spy (flame graph, speedscope, top)",
        description="Samples the stacks of one process of a live broker with py-spy, without "
                    "stopping it: TARGET is `partition TOPIC/N`, coordinator, router, "
                    "supervisor (pids from runtime.json) or a pid.",
        epilog=_PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    prof.add_argument("target", nargs="+", metavar="TARGET",
                      help="partition TOPIC/N | coordinator | router | supervisor | PID")
    prof.add_argument("--duration", type=int, default=5, metavar="S",
                      help="seconds to sample (default 5)")
    prof.add_argument("--output", "-o", default=None, metavar="FILE",
                      help="default: profile-<target>-<pid>-<time>.<svg|speedscope.json|txt>")
    prof.add_argument("--format", choices=["flamegraph", "speedscope", "raw"],
                      default="flamegraph", help="flamegraph: SVG (default); speedscope: JSON "
                      "for speedscope.app; raw: collapsed stacks for flamegraph.pl")
    prof.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                      help="include C frames (our native core, CPython); default: on where "
                           "py-spy supports it (Linux x86_64)")
    prof.add_argument("--top", action="store_true",
                      help="py-spy top: a live per-function view until you quit it")
    prof.add_argument("--rate", type=int, default=100, metavar="HZ",
                      help="samples a second (default 100)")
    prof.add_argument("--nonblocking", action="store_true",
                      help="do not pause the target for each sample (less overhead, may be "
                           "less accurate)")
    prof.add_argument("--idle", action="store_true",
                      help="include threads that are sleeping (waiting on the doorbell, etc.)")
    _add_data_dir(prof)
    prof.set_defaults(func=_cmd_profile)


def _cmd_consume(args: argparse.Namespace) -> int:
    from .client.console import consume

    return consume(_broker(args), args.topic, from_beginning=args.from_beginning,
                   partition=args.partition, offset=args.offset, group=args.group,
                   from_time_ms=_time_ms_arg(args.from_time, "--from-time"),
                   max_messages=args.max_messages, timeout_ms=args.timeout_ms, fmt=args.format,
                   client_options=_client_options(args))


def _add_consume_command(sub) -> None:
    consume = sub.add_parser(
        "consume", help="print records of a topic (like kafka-console-consumer / kcat -C)",
        description="Reads committed records straight from the partitions' segments and prints "
                    "one per --format. Starts at the end unless --from-beginning or --offset.")
    consume.add_argument("topic")
    consume.add_argument("--from-beginning", action="store_true",
                         help="start at the log start instead of the end")
    consume.add_argument("--partition", type=int, default=None, help="only this partition")
    consume.add_argument("--offset", default=None,
                         help="with --partition: N, -N (N before the end), earliest or latest")
    consume.add_argument("--from-time", default=None, metavar="ISO|MS",
                         help="start at the first record at or after this time: an ISO 8601 "
                              "date and time (UTC unless it says otherwise) or ms since the "
                              "epoch (kcat -o s@MS); partitions with none start at the end")
    consume.add_argument("--group", default=None,
                         help="join this consumer group (it assigns the partitions; offsets "
                              "are committed as records are printed)")
    consume.add_argument("--max-messages", type=int, default=None, help="exit after N records")
    consume.add_argument("--timeout-ms", type=int, default=None,
                         help="exit after this long without a record")
    consume.add_argument("--format", default="%s\\n",
                         help="kcat codes: %%s value, %%k key, %%o offset, %%p partition, "
                              "%%t topic, %%T timestamp, %%S/%%K sizes, %%h headers; \\n \\t "
                              "(default: %%s\\n)")
    _add_target(consume)
    consume.set_defaults(func=_cmd_consume)


def _cmd_produce(args: argparse.Namespace) -> int:
    from .client.console_producer import produce_lines

    return produce_lines(_broker(args), args.topic, sys.stdin.buffer,
                         key_separator=args.key_separator, partition=args.partition,
                         acks=args.acks, verbose=args.verbose,
                         client_options=_client_options(args))


def _add_produce_command(sub) -> None:
    produce = sub.add_parser(
        "produce", help="send stdin lines as records (like kafka-console-producer)",
        description="One record per stdin line. Prints nothing on success; errors are one "
                    "line and exit status 1.")
    produce.add_argument("topic")
    produce.add_argument("--key-separator", default=None, metavar="SEP",
                         help="text before the first SEP of a line is the record's key")
    produce.add_argument("--partition", type=int, default=None,
                         help="send every record to this partition (default: by key, or sticky)")
    produce.add_argument("--acks", choices=["0", "1", "all"], default="1",
                         help="0: in the ring; 1: appended to the log (default); all: fsynced")
    produce.add_argument("--verbose", action="store_true",
                         help="print the number of records produced at the end (stderr)")
    _add_target(produce)
    produce.set_defaults(func=_cmd_produce)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="the broker's data dir (default: $SHMBROKER_DATA_DIR or "
                             "~/.local/share/shmbroker)")


def _add_target(parser: argparse.ArgumentParser) -> None:
    """A client command's broker: a local data dir, or a router's address (remote)."""
    _add_data_dir(parser)
    parser.add_argument("--broker", default=None, metavar="tcp://HOST:PORT",
                        help="a broker's router instead of a local data dir (remote client)")
    parser.add_argument("--curve-server-key", default=None, metavar="KEY|FILE",
                        help="with --broker: the router's public key (its NAME.key file or Z85 "
                             "text), for a router that requires CURVE")
    parser.add_argument("--curve-secret-key-file", default=None, metavar="FILE",
                        help="with --broker: this client's NAME.key_secret (mode 0600)")


def _broker(args: argparse.Namespace) -> str:
    if args.broker is None:
        return args.data_dir
    if not args.broker.startswith("tcp://"):
        raise errors.ConfigError(f"--broker {args.broker!r}: expected tcp://HOST:PORT (a "
                                 f"broker's router); a local broker is --data-dir DIR")
    return args.broker


def _client_options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name in ("curve_server_key",
                                                      "curve_secret_key_file")
               if getattr(args, name) is not None}
    if options and args.broker is None:
        raise errors.ConfigError("--curve-server-key and --curve-secret-key-file go with "
                                 "--broker tcp://HOST:PORT (a local broker needs no keys)")
    return options


def _add_serve_command(sub) -> None:
    serve = sub.add_parser(
        "serve", help="run the broker in the foreground (Ctrl-C or SIGTERM stops it cleanly)",
        description="Starts the supervisor, the coordinator, the router for remote clients "
                    f"(on {ROUTER_LISTEN_DEFAULT} unless --listen says otherwise) and one "
                    "process per partition; restarts any that dies. One broker per data dir. "
                    "Flags win over --config FILE entries, which win over the defaults.",
        epilog="exit status: 0 stopped cleanly; 1 could not start or run (another broker on "
               "the data dir, a taken port, ...); 2 bad arguments or config file. "
               "See README (\"Remote clients and security\").")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="a TOML file with any of: data_dir, listen, "
                            "curve_server_secret_key_file, curve_allowed_clients_dir, "
                            "metrics_listen, metrics_allow_remote, kafka_listen, "
                            "partition_spin_us "
                            "(relative paths: from the file's directory)")
    serve.add_argument("--data-dir", default=None,
                       help="the broker's data dir (default: $SHMBROKER_DATA_DIR or "
                            "~/.local/share/shmbroker)")
    serve.add_argument("--partition-spin-us", type=int, default=None, metavar="US",
                       help="each partition process busy-waits this long for new frames before "
                            "it sleeps: lower latency, a busy core per partition (default 0)")
    serve.add_argument("--listen", default=None, metavar="tcp://HOST:PORT|none",
                       help="where the router for remote clients (Producer/Consumer/Admin with "
                            f"broker=\"tcp://...\") listens; default {ROUTER_LISTEN_DEFAULT}; "
                            "port * picks a free one (written to runtime.json); none: no "
                            "router. A non-loopback address needs CURVE (the two flags below)")
    serve.add_argument("--curve-server-secret-key-file", default=None, metavar="FILE",
                       help="the router's CURVE secret key (NAME.key_secret from `shmbroker "
                            "keys generate`, mode 0600): clients must authenticate")
    serve.add_argument("--curve-allowed-clients-dir", default=None, metavar="DIR",
                       help="the public keys (NAME.key files) of the clients allowed to "
                            "connect; read again when files are added or removed")
    serve.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics (counters of every process, lag per "
                            "group and partition) at http://HOST:PORT/metrics, e.g. "
                            "127.0.0.1:9644 (port 0 picks a free one, written to runtime.json); "
                            "off by default, loopback only unless --metrics-allow-remote")
    serve.add_argument("--metrics-allow-remote", action="store_true", default=None,
                       help="let --metrics-listen bind a non-loopback address (the endpoint "
                            "has no authentication)")
    serve.add_argument("--kafka-listen", default=None, metavar="HOST:PORT",
                       help="speak Kafka's wire protocol here, so Kafka clients (kafka-python, "
                            "...) produce and consume unchanged, e.g. 127.0.0.1:9092 (port 0 "
                            "picks a free one, written to runtime.json); off by default; "
                            "loopback only (no authentication yet)")
    serve.add_argument("--hot-window-bytes", type=int, default=None, metavar="BYTES",
                       help="router: a remote consumer more than this many bytes of log behind "
                            "a partition's end gets the bytes by sendfile on a data connection "
                            f"(a cold read) instead of in the fetch reply (default "
                            f"{COLD_READ_HOT_WINDOW_BYTES_DEFAULT})")
    serve.set_defaults(func=_cmd_serve)


def _add_broker_commands(sub) -> None:
    _add_serve_command(sub)
    topics = sub.add_parser("topics", help="create, list, describe, alter and delete topics",
                            description="Topic administration of a running broker.")
    tsub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = tsub.add_parser("create", help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, required=True)
    create.add_argument("--config", action="append", metavar="KEY=VALUE",
                        help="topic setting, ours or Kafka's name (retention.ms=3600000); repeatable")
    listing = tsub.add_parser("list", help="list topic names")
    describe = tsub.add_parser("describe", help="partitions and settings of a topic")
    describe.add_argument("name")
    delete = tsub.add_parser("delete", help="delete a topic and its data")
    delete.add_argument("name")
    alter = tsub.add_parser("alter", help="increase the partition count of a topic")
    alter.add_argument("name")
    alter.add_argument("--partitions", type=int, required=True)
    for parser in (create, listing, describe, delete, alter):
        _add_target(parser)
    topics.set_defaults(func=_cmd_topics)
    _add_groups_command(sub)


def _add_groups_command(sub) -> None:
    groups = sub.add_parser("groups", help="list, describe, reset offsets of, delete groups",
                            description="Consumer group administration of a running broker "
                                        "(like kafka-consumer-groups).")
    gsub = groups.add_subparsers(dest="groups_command", metavar="ACTION", required=True)
    listing = gsub.add_parser("list", help="groups with members or committed offsets")
    describe = gsub.add_parser("describe", help="members (pid, host, assignment) and, per "
                                                "partition, committed offset, end offset, lag")
    describe.add_argument("group")
    reset = gsub.add_parser("reset-offsets", help="set a group's committed offsets of a topic "
                                                  "(refused while the group has members)")
    reset.add_argument("group")
    reset.add_argument("--topic", required=True)
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-earliest", action="store_true", help="the log start")
    where.add_argument("--to-latest", action="store_true", help="the end (skip everything)")
    where.add_argument("--to-offset", type=int, metavar="N", help="offset N (clamped)")
    where.add_argument("--to-datetime", metavar="ISO",
                       help="first record at or after this time (e.g. 2026-11-28T10:00:00+00:00; "
                            "UTC if no offset is given)")
    delete = gsub.add_parser("delete", help="delete a group without members, and its offsets")
    delete.add_argument("group")
    for parser in (listing, describe, reset, delete):
        _add_target(parser)
    groups.set_defaults(func=_cmd_groups)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbroker",
        description="Kafka's design rebuilt for one large host: a durable, replayable log "
                    "served from the page cache and shared memory.")
    parser.add_argument("--version", action="version", version=f"shmbroker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="start a broker, produce and consume in separate processes, print what happened",
        description="What `make run` runs: starts `shmbroker serve` on the data dir, creates the "
                    "topic demo-events (4 partitions), runs 2 producer and 2 consumer processes "
                    "through shared memory, checks every record arrived, and stops the broker. "
                    "With --log-only: the partition log alone (append, roll, read back, time "
                    "lookup), no broker process.")
    demo.add_argument("--data-dir", default=default_data_dir(),
                      help="the broker's data dir (default: $SHMBROKER_DATA_DIR or "
                           "~/.local/share/shmbroker); stop any broker already serving it first")
    demo.add_argument("--records", type=int, default=200_000, help="records to write (default 200000)")
    demo.add_argument("--log-only", action="store_true", help="the partition log demo, without a broker")
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
    _add_broker_commands(sub)
    _add_consume_command(sub)
    _add_produce_command(sub)
    _add_top_command(sub)
    _add_profile_command(sub)
    _add_keys_command(sub)
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
