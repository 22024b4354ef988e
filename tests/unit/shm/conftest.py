from __future__ import annotations

import pytest

from shmbroker.shm import names, region


@pytest.fixture
def prefix(tmp_path):
    """A broker prefix of its own for each test; anything left under it is removed after the
    test (the leak check in tests/conftest.py still fails a test that relied on this)."""
    p = names.broker_prefix(tmp_path)
    yield p
    from shmbroker.shm.stale import list_names
    for name in list_names(p):
        region.unlink(name)
