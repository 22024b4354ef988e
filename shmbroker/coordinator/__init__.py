"""The coordinator process: topic metadata now, consumer groups next (issue 4).

``topics.py`` (rules, registry, its file) and ``protocol.py`` (the request format) are plain
code; ``server.py`` is the thin ZeroMQ loop around them. Run by the supervisor as
``python -m shmbroker.coordinator --data-dir D ...``.
"""
