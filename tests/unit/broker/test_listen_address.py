"""HOST:PORT of the broker's plain TCP listeners (metrics, Kafka): parsed with the flag named
in every error, loopback told apart, a taken port found before `serve` starts anything."""
import socket

import pytest

from shmbroker.broker.listen_address import parse_host_port, try_bind
from shmbroker.errors import ConfigError, ShmbrokerError


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:9092", ("127.0.0.1", 9092, True)),
    ("[::1]:0", ("::1", 0, True)),
    ("localhost:1", ("localhost", 1, True)),
    ("0.0.0.0:9644", ("0.0.0.0", 9644, False)),
    ("broker.example:7", ("broker.example", 7, False)),
])
def test_host_port_is_parsed_and_loopback_told_apart(listen, expected):
    assert parse_host_port(listen, "--x", "e.g.") == expected


@pytest.mark.parametrize("listen", ["9092", ":9092", "127.0.0.1:", "127.0.0.1:65536",
                                    "127.0.0.1:-1", "127.0.0.1:port"])
def test_a_malformed_address_is_a_config_error_naming_the_flag(listen):
    with pytest.raises(ConfigError, match="--kafka-listen .*expected HOST:PORT"):
        parse_host_port(listen, "--kafka-listen", "127.0.0.1:9092")


def test_a_taken_port_is_one_clear_error_and_port_0_is_never_taken():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = held.getsockname()[1]
        with pytest.raises(ShmbrokerError, match=f"--kafka-listen 127.0.0.1:{port}: cannot bind"):
            try_bind("127.0.0.1", port, "--kafka-listen", f"127.0.0.1:{port}", "listening")
        try_bind("127.0.0.1", 0, "--kafka-listen", "127.0.0.1:0", "listening")
    finally:
        held.close()
