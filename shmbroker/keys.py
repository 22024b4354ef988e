"""CURVE key files: made by `shmbroker keys generate`, read by the router (its secret key, the
allow-list of clients' public keys) and by remote clients (the server's public key, their own
secret key).

The files are pyzmq's certificate format (``zmq.auth.create_certificates``), a ZeroMQ
convention other tools read too, not one of ours::

    NAME.key          the public key, to hand out (the server's to clients; a client's to
                      the broker's allow-list directory). Mode 0644.
    NAME.key_secret   the public and the secret key; never leaves its owner. Mode 0600.

    #   ****  Generated on 2026-11-28 10:00:00 by pyzmq  ****
    #   ZeroMQ CURVE **Secret** Certificate
    #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

    metadata
    curve
        public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
        secret-key = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"

Keys travel as Z85 text (40 characters for 32 bytes), as ZeroMQ's socket options take them.
A secret key file that other users can read is refused (as ssh refuses such a private key):
a key anyone on the host can copy authenticates nobody.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile

from .errors import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: A key's Z85 text: 32 bytes are 40 characters.
Z85_KEY_CHARS = 40
#: Key names become file names (and the User-Id the router logs): a plain word.
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
KEY_DIR_MODE = 0o700


def generate(out_dir: str, name: str, force: bool = False) -> tuple[str, str, bytes]:
    """Write a new key pair as ``out_dir/NAME.key`` and ``out_dir/NAME.key_secret``; returns
    (public file, secret file, public key as Z85). ``out_dir`` is made 0700 if missing.
    Existing files of that name are kept (ConfigError) unless ``force``.

    The pair is written into a fresh 0700 directory inside ``out_dir`` and moved into place
    once its modes are set, so the secret key is never readable by others, not even for the
    instant between pyzmq's write and our chmod."""
    import zmq.auth

    if not KEY_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"--name {name!r}: expected 1-64 characters of [A-Za-z0-9._-], not "
                          f"starting with '.' or '-'")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir}: not a directory")
    os.makedirs(out_dir, mode=KEY_DIR_MODE, exist_ok=True)
    public_path = os.path.join(out_dir, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(out_dir, name + SECRET_SUFFIX)
    if not force:
        for path in (public_path, secret_path):
            if os.path.lexists(path):
                raise ConfigError(f"{path} exists already; pass --force to replace it (whoever "
                                  f"uses the old key is refused from then on)")
    scratch = tempfile.mkdtemp(prefix=".keys-", dir=out_dir)  # 0700
    try:
        made_public, made_secret = zmq.auth.create_certificates(scratch, name)
        os.chmod(made_secret, SECRET_FILE_MODE)
        os.chmod(made_public, PUBLIC_FILE_MODE)
        public_key, _ = zmq.auth.load_certificate(made_public)
        # Secret first: a public key on disk must always have its secret beside it.
        _move(made_secret, secret_path, force)
        _move(made_public, public_path, force)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public_path, secret_path, public_key


def _move(src: str, dst: str, replace: bool) -> None:
    if replace:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)  # never clobbers: a file made meanwhile is an error, not lost
    except FileExistsError:
        raise ConfigError(f"{dst} exists already; pass --force to replace it") from None


def check_z85_key(key: str | bytes, what: str) -> bytes:
    """``key`` as Z85 bytes, checked to decode to 32 bytes; ConfigError naming ``what``."""
    from zmq.utils import z85

    raw = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
    try:
        if len(raw) != Z85_KEY_CHARS or len(z85.decode(raw)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{what}: not a CURVE key (expected {Z85_KEY_CHARS} characters of "
                          f"Z85 text, as in the public-key line of a .key file)") from None
    return raw


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path}: no such file (make a key pair with `shmbroker keys "
                          f"generate --out DIR --name NAME`)")
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: not a ZeroMQ certificate file ({exc})") from None
    check_z85_key(public_key, f"{what} {path}: its public-key")
    if secret_key is not None:
        check_z85_key(secret_key, f"{what} {path}: its secret-key")
    return public_key, secret_key


def load_public_key(path: str, what: str = "public key file") -> bytes:
    """The public key (Z85) of a ``.key`` file (a ``.key_secret`` file has it too)."""
    return _load(path, what)[0]


def load_secret_key(path: str, what: str = "secret key file") -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file; ConfigError if it is missing, holds
    no secret key, or can be read by other users."""
    public_key, secret_key = _load(path, what)
    if secret_key is None:
        raise ConfigError(f"{what} {path}: holds no secret key (pass NAME{SECRET_SUFFIX}, not "
                          f"NAME{PUBLIC_SUFFIX})")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {path}: mode {mode:04o} lets other users read the secret "
                          f"key; chmod 600 {path}")
    return public_key, secret_key


def public_key_or_file(value: str | bytes | os.PathLike, what: str) -> bytes:
    """A public key given as its Z85 text or as the path of a ``.key`` file."""
    if isinstance(value, (str, bytes)) and len(value) == Z85_KEY_CHARS and \
            not os.path.exists(value):
        return check_z85_key(value, what)
    return load_public_key(os.fspath(value) if not isinstance(value, bytes)
                           else value.decode(errors="replace"), what)
