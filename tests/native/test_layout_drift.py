"""The C core is compiled from the generated layout header: prove that the header and the
numbers compiled into shmbroker._native equal the one Python declaration."""
from __future__ import annotations

import pathlib
import subprocess
import sys

from shmbroker import _native
from shmbroker.layout import record_batch as L

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_header_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gen_layout.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_crc32c_tables_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gen_crc32c_tables.py"),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_compiled_layout_equals_python_declaration():
    want = {f"{f.name}_offset": f.offset for f in L.FIELDS}
    want.update(L.CONSTANTS)
    assert _native.LAYOUT == want


def test_compiled_shm_layout_equals_python_declaration():
    """Every offset and constant of shmbroker/layout/shm.py, as compiled into the C core."""
    import importlib.util

    from shmbroker.layout import shm

    spec = importlib.util.spec_from_file_location("gen_layout", ROOT / "tools/gen_layout.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    want = {}
    groups = {"ctl": shm.CONTROL_FIELDS, "slot": shm.SLOT_FIELDS,
              "ring": shm.RING_FIELDS,
              "compl": shm.COMPLETION_FIELDS, "frame": shm.FRAME_FIELDS}
    for prefix, fields in groups.items():
        want.update({f"{prefix}_{f.name}_offset": f.offset for f in fields})
    want.update(shm.CONSTANTS)
    assert {k for k, _ in gen.shm_layout_entries()} == set(want)
    assert _native.SHM_LAYOUT == want
