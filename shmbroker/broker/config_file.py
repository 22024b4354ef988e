"""`shmbroker serve --config FILE`: the broker's settings in a small TOML file, so that keys
and addresses need not be repeated on every command line (and a service unit names one file).

Every entry is optional; a flag given on the command line wins over the file, and the file
over the built-in default. Relative paths in the file are relative to the file's directory
(so a file and its keys can move together). An unknown entry, a wrong type, a file that is
not TOML: ConfigError naming the file and the entry (`serve` exits 2, as for a bad flag).

    # /etc/shmbroker/broker.toml
    data_dir = "/var/lib/shmbroker"
    listen = "tcp://0.0.0.0:7070"            # "none": no router; default tcp://127.0.0.1:7070
    curve_server_secret_key_file = "keys/server.key_secret"
    curve_allowed_clients_dir = "clients"    # one NAME.key per allowed client
    metrics_listen = "127.0.0.1:9644"
    metrics_allow_remote = false
    kafka_listen = "127.0.0.1:9092"
    partition_spin_us = 0

The entries are exactly `serve`'s flags (``--curve-allowed-clients-dir`` is
``curve_allowed_clients_dir``); SERVE_FILE_ENTRIES is the list, with each one's meaning.
"""
from __future__ import annotations

import os
import tomllib
from typing import Any, Mapping

from ..config import ROUTER_LISTEN_DEFAULT, BrokerConfig, default_data_dir
from ..errors import ConfigError

#: A config file larger than this is not one (a mistaken path to a log or a binary).
CONFIG_FILE_BYTES_MAX = 64 * 1024
#: Entry -> (type, whether it is a path, what it means). The README and
#: docs/design/router.md list the same entries.
SERVE_FILE_ENTRIES: dict[str, tuple[type, bool, str]] = {
    "data_dir": (str, True, "the broker's data directory"),
    "listen": (str, False, f"the router's tcp://HOST:PORT (default {ROUTER_LISTEN_DEFAULT}; "
                           f"\"none\": no router; non-loopback only with CURVE)"),
    "curve_server_secret_key_file": (str, True, "the router's NAME.key_secret (mode 0600)"),
    "curve_allowed_clients_dir": (str, True, "directory of the allowed clients' NAME.key files"),
    "metrics_listen": (str, False, "HOST:PORT of the Prometheus endpoint (default: none)"),
    "metrics_allow_remote": (bool, False, "let metrics_listen be a non-loopback address"),
    "kafka_listen": (str, False, "HOST:PORT of the Kafka protocol listener (default: none; "
                                 "loopback only; port 0 picks a free one)"),
    "partition_spin_us": (int, False, "busy-wait of each partition process before it sleeps"),
    "hot_window_bytes": (int, False, "a remote consumer further behind than this many bytes "
                                     "gets a cold read (sendfile)"),
}
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}
#: `--listen none` / ``listen = "none"``: no router.
LISTEN_NONE = "none"


def load_serve_file(path: str) -> dict[str, Any]:
    """The file's entries, checked and with paths made absolute (ConfigError otherwise)."""
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    if len(data) > CONFIG_FILE_BYTES_MAX:
        raise ConfigError(f"--config {path}: larger than {CONFIG_FILE_BYTES_MAX} bytes; is "
                          f"it the right file?")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    entries = {}
    for name, value in doc.items():
        if name not in SERVE_FILE_ENTRIES:
            raise ConfigError(f"--config {path}: unknown entry {name!r}; the entries are "
                              f"{', '.join(SERVE_FILE_ENTRIES)}")
        kind, is_path, _ = SERVE_FILE_ENTRIES[name]
        # bool is an int in Python; an entry that wants a number must not take `true`.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"--config {path}: {name} = {value!r}: expected "
                              f"{_KIND_NAMES[kind]}")
        if is_path:
            value = os.path.join(base, os.path.expanduser(value))
        entries[name] = value
    return entries


def serve_settings(flags: Mapping[str, Any], config_path: str | None) -> tuple[str, BrokerConfig]:
    """(data dir, BrokerConfig) of `serve`: ``flags`` are the command line's values, None where
    a flag was not given; then the file's entries; then the defaults."""
    entries = load_serve_file(config_path) if config_path is not None else {}
    merged = {**entries, **{k: v for k, v in flags.items() if v is not None}}
    data_dir = merged.pop("data_dir", None) or default_data_dir()
    listen = merged.pop("listen", ROUTER_LISTEN_DEFAULT)
    if listen == LISTEN_NONE:
        listen = None
    return data_dir, BrokerConfig(listen=listen, **merged)
