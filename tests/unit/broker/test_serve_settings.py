"""`serve`'s settings: the router on tcp://127.0.0.1:7070 unless told otherwise, flags over the
--config file over the defaults, relative paths in the file taken from the file's directory.
(Nothing is started or bound here; test_router_auth.py runs brokers.)"""
import pytest

from shmbroker.broker.config_file import SERVE_FILE_ENTRIES, serve_settings
from shmbroker.cli import build_parser
from shmbroker.config import ROUTER_LISTEN_DEFAULT, BrokerConfig
from shmbroker.errors import ConfigError


def settings(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    return serve_settings({name: getattr(args, name) for name in SERVE_FILE_ENTRIES}, args.config)


def test_serve_starts_a_router_on_loopback_port_7070_by_default():
    assert ROUTER_LISTEN_DEFAULT == "tcp://127.0.0.1:7070"
    _, config = settings("--data-dir", "/tmp/x")
    assert config.listen == "tcp://127.0.0.1:7070" and not config.curve
    assert settings("--listen", "none")[1].listen is None
    assert BrokerConfig().listen is None  # a broker made in code binds nothing unless asked


def test_flags_win_over_the_file_and_paths_in_the_file_are_relative_to_it(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('data_dir = "data"\nlisten = "tcp://0.0.0.0:7071"\n'
                    'curve_server_secret_key_file = "k/server.key_secret"\n'
                    'curve_allowed_clients_dir = "~/allowed"\nmetrics_allow_remote = true\n'
                    'partition_spin_us = 5\n')
    data_dir, config = settings("--config", str(path))
    assert data_dir == str(tmp_path / "data")
    assert config.listen == "tcp://0.0.0.0:7071" and config.curve
    assert config.curve_server_secret_key_file == str(tmp_path / "k/server.key_secret")
    assert config.curve_allowed_clients_dir.endswith("/allowed")
    assert "~" not in config.curve_allowed_clients_dir
    assert config.metrics_allow_remote is True and config.partition_spin_us == 5
    data_dir, config = settings("--config", str(path), "--data-dir", "/tmp/y", "--listen",
                                "none", "--partition-spin-us", "0")
    assert data_dir == "/tmp/y" and config.listen is None and config.partition_spin_us == 0
    path.write_text('listen = "none"\n')
    assert settings("--config", str(path))[1].listen is None


@pytest.mark.parametrize("text, message", [
    ("listen = [", "not valid TOML"),
    ('listen = "a"\nlisten = "b"\n', "not valid TOML"),
    ("curve = 1\n", "unknown entry 'curve'"),
    ("[router]\nlisten = 'x'\n", "unknown entry 'router'"),
    ("metrics_allow_remote = 1\n", "expected true or false"),
    ("partition_spin_us = true\n", "expected an integer"),
    ("listen = 7070\n", "expected a string"),
    ('curve_allowed_clients_dir = "a"\n', "needs both"),
])
def test_a_bad_config_file_is_a_config_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        settings("--config", str(path))
    assert str(path) in str(caught.value) or message == "needs both"


def test_the_hot_window_comes_from_the_flag_the_file_or_the_default(tmp_path):
    from shmbroker.config import COLD_READ_HOT_WINDOW_BYTES_DEFAULT

    assert settings()[1].hot_window_bytes == COLD_READ_HOT_WINDOW_BYTES_DEFAULT
    path = tmp_path / "b.toml"
    path.write_text("hot_window_bytes = 1048576\n")
    assert settings("--config", str(path))[1].hot_window_bytes == 1 << 20
    assert settings("--config", str(path), "--hot-window-bytes", "4096")[1].hot_window_bytes == 4096
