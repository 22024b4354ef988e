"""Loads the C core, shmbroker._native, or fails loudly.

We never fall back to the pure-Python reference at run time: it is 50-100x slower and a
silent fallback would turn a build problem into a mysterious performance problem.
"""
from __future__ import annotations

from .errors import NativeExtensionMissing

try:
    from . import _native  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - exercised by hand, not in the suite
    raise NativeExtensionMissing(
        "shmbroker._native (the C core) is not built or failed to load: "
        f"{exc}. Build it with `make native` (or `pip install -e .` inside the virtualenv); "
        "it needs a C11 compiler (gcc or clang) and the Python headers (python3-dev)."
    ) from exc

__all__ = ["_native"]
