"""Byte layouts, each declared exactly once.

A layout module here is the single source of truth; ``tools/gen_layout.py`` writes the
matching C header under ``native/include/shmb/`` and ``tests/native/test_layout_drift.py``
fails when the header and the declaration disagree (or when the compiled extension reports
different numbers).
"""
