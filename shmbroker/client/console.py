"""`shmbroker consume`: print records like kafka-console-consumer / kcat.

Format codes are kcat's (``-f``): ``%s`` value, ``%k`` key, ``%o`` offset, ``%p`` partition,
``%t`` topic, ``%T`` timestamp (ms), ``%S`` value size, ``%K`` key size (-1 for null),
``%h`` headers (``k=v,k2=v2``), ``%%`` a percent sign; escapes ``\\n``, ``\\t``, ``\\r``,
``\\\\``. A null key or value prints as nothing. Output is bytes: values are written as they are.
"""
from __future__ import annotations

import sys
from typing import BinaryIO, Callable

from .. import errors
from .consumer import Consumer
from .types import TopicPartition

DEFAULT_FORMAT = "%s\\n"
_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\", "0": b"\0"}


def _field(code: str) -> Callable:
    def b(x) -> bytes:
        return b"" if x is None else bytes(x)

    def size(x) -> bytes:
        return b"-1" if x is None else str(len(x)).encode()

    def headers(r) -> bytes:
        return b",".join(k.encode() + b"=" + (b"" if v is None else bytes(v)) for k, v in r.headers)

    fields: dict[str, Callable] = {
        "s": lambda r: b(r.value), "k": lambda r: b(r.key),
        "o": lambda r: str(r.offset).encode(), "p": lambda r: str(r.partition).encode(),
        "t": lambda r: r.topic.encode(), "T": lambda r: str(r.timestamp).encode(),
        "S": lambda r: size(r.value), "K": lambda r: size(r.key), "h": headers,
    }
    if code not in fields:
        raise errors.ConfigError(f"--format: unknown code %{code} (known: %s %k %o %p %t %T %S %K %h %%)")
    return fields[code]


def compile_format(fmt: str) -> Callable[[object], bytes]:
    """A function record -> bytes for a kcat-style format string (see module doc)."""
    parts: list = []
    literal = bytearray()
    i = 0
    # Bounded by the length of the format string.
    while i < len(fmt):
        c = fmt[i]
        if c in "%\\" and i + 1 < len(fmt):
            nxt = fmt[i + 1]
            i += 2
            if c == "\\":
                literal += _ESCAPES.get(nxt, ("\\" + nxt).encode())
            elif nxt == "%":
                literal += b"%"
            else:
                if literal:
                    parts.append(bytes(literal))
                    literal = bytearray()
                parts.append(_field(nxt))
            continue
        literal += c.encode()
        i += 1
    if literal:
        parts.append(bytes(literal))
    if len(parts) == 2 and parts[1] == b"\n" and fmt.startswith("%s"):
        return lambda r: (r.value or b"") + b"\n"  # the default, without the join
    return lambda r: b"".join(p if isinstance(p, bytes) else p(r) for p in parts)


def _start(consumer: Consumer, tp: TopicPartition, offset: str) -> None:
    if offset in ("earliest", "beginning"):
        consumer.seek_to_beginning(tp)
    elif offset in ("latest", "end"):
        consumer.seek_to_end(tp)
    else:
        try:
            value = int(offset)
        except ValueError:
            raise errors.ConfigError(
                f"--offset {offset!r}: expected a number, -N (N before the end), "
                f"earliest or latest") from None
        if value < 0:
            consumer.seek_to_end(tp)
            start = consumer.beginning_offsets([tp])[tp]
            value = max(start, consumer.position(tp) + value)
        consumer.seek(tp, value)


def consume(data_dir: str, topic: str, *, from_beginning: bool = False,
            partition: int | None = None, offset: str | None = None, group: str | None = None,
            from_time_ms: int | None = None, max_messages: int | None = None, timeout_ms: int | None = None,
            fmt: str = DEFAULT_FORMAT, out: BinaryIO | None = None,
            client_options: dict | None = None) -> int:
    """Print records of ``topic`` until ``max_messages`` or ``timeout_ms`` without one.
    ``data_dir`` may be a router's ``tcp://`` address; ``client_options`` go to the Consumer
    (CURVE keys)."""
    if offset is not None and partition is None:
        raise errors.ConfigError("--offset needs --partition (an offset belongs to one partition)")
    if max_messages is not None and max_messages < 0:
        raise errors.ConfigError("--max-messages must be >= 0")
    if from_time_ms is not None and (offset is not None or from_beginning or group is not None):
        raise errors.ConfigError("--from-time excludes --offset, --from-beginning and --group "
                                 "(each says where to start)")
    render = compile_format(fmt)
    out = out if out is not None else sys.stdout.buffer
    if group is not None and partition is not None:
        raise errors.ConfigError("--group and --partition exclude each other (the group assigns "
                                 "the partitions)")
    # With a group the consumer subscribes through it (and commits as it goes, then leaves on
    # close); --from-beginning then applies to partitions the group has no offset for.
    with Consumer(*([topic] if group is not None else []), broker=data_dir, group=group,
                  auto_offset_reset="earliest" if from_beginning else "latest",
                  **(client_options or {})) as consumer:
        if group is None and partition is None:
            consumer.subscribe([topic])
        elif partition is not None:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            if offset is not None:
                _start(consumer, tp, offset)
        if from_time_ms is not None:
            found = consumer.offsets_for_times({tp: from_time_ms for tp in consumer.assignment()})
            for tp, at in found.items():
                if at is None:
                    consumer.seek_to_end(tp)  # nothing that late yet: only new records
                else:
                    consumer.seek(tp, at.offset)
        printed = 0
        # Ends at max_messages, at timeout_ms without a record, or by a signal (Ctrl-C).
        while max_messages is None or printed < max_messages:
            wait = 1000 if timeout_ms is None else timeout_ms
            want = 500 if max_messages is None else min(500, max_messages - printed)
            got = consumer.poll(timeout_ms=wait, max_records=want)
            if not got:
                if timeout_ms is not None:
                    break
                continue
            out.write(b"".join(map(render, got)))
            out.flush()
            printed += len(got)
    return 0
