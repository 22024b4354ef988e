"""`shmbroker produce TOPIC`: stdin lines become records, like kafka-console-producer.

One record per line (the line's end is not part of the value). With ``key_separator``, the text
before the first separator is the key (a line without it is an error, as in Kafka's console
producer with ``parse.key=true``). Prints nothing on success; with ``verbose``, the number of
records on stderr at the end. Errors are shmbroker.errors, printed by the CLI as one line.
"""
from __future__ import annotations

import sys
from typing import BinaryIO, TextIO

from .. import errors
from .producer import Producer


def produce_lines(data_dir: str, topic: str, lines: BinaryIO, key_separator: str | None = None,
                  partition: int | None = None, acks="1", verbose: bool = False,
                  err: TextIO = sys.stderr, client_options: dict | None = None) -> int:
    separator = key_separator.encode() if key_separator else None
    count = 0
    with Producer(broker=data_dir, acks=acks, **(client_options or {})) as producer:
        producer.partitions_for(topic)  # an unknown topic fails before reading stdin
        futures = []
        for number, line in enumerate(lines, 1):  # bounded by the input
            value = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
            key = None
            if separator is not None:
                key, found, value = value.partition(separator)
                if not found:
                    raise errors.ConfigError(
                        f"line {number} has no key separator {key_separator!r}")
            futures.append(producer.send(topic, value, key=key, partition=partition))
            count += 1
            if len(futures) >= 10_000:
                _check(futures)
        producer.flush()
        _check(futures)
    if verbose:
        print(f"{count} record(s) produced to {topic}", file=err)
    return 0


def _check(futures: list) -> None:
    """Raise the first failed record's error (typed), so the CLI exits 1 naming it."""
    for future in futures:
        future.result()
    futures.clear()
