"""``HOST:PORT`` addresses of the broker's plain TCP listeners (the Prometheus endpoint, the
Kafka listener): parsed, checked for loopback, and tried before `serve` starts anything, so
that a bad or taken address is one clear line at start instead of a child that keeps dying.
(The router's ``tcp://`` address is ZeroMQ's and is checked by its own code.)"""
from __future__ import annotations

import ipaddress
import socket

from ..errors import ConfigError, ShmbrokerError


def parse_host_port(listen: str, flag: str, example: str) -> tuple[str, int, bool]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free one) -> (host, port,
    is_loopback). ConfigError naming ``flag`` for anything else; a host that is neither an IP
    address nor localhost is not loopback."""
    host, sep, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag} {listen!r}: expected HOST:PORT, e.g. {example}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return host, int(port_text), loopback


def try_bind(host: str, port: int, flag: str, listen: str, what: str) -> None:
    """Bind and close at once: a taken port is a one-line error naming ``flag`` (port 0 is
    never taken). SO_REUSEADDR as the listeners themselves bind, so a port in TIME_WAIT of a
    previous run is not mistaken for a taken one."""
    if port == 0:
        return
    trial = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        trial.bind((host, port))
    except OSError as exc:
        raise ShmbrokerError(f"{flag} {listen}: cannot bind ({exc.strerror}); is another "
                             f"broker {what} there? pass another port") from None
    finally:
        trial.close()
