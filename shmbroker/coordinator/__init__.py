"""The coordinator process: topic metadata, and consumer groups and committed offsets (issue 4).

``topics.py`` (rules, registry, its file), ``protocol.py`` (the request format),
``group.py`` (one group's membership state machine), ``assignors.py`` (range, round-robin,
cooperative-sticky) and ``offsets.py`` (committed offsets in ``__consumer_offsets-0``) are
plain code with an injected clock; ``group_service.py`` runs them for the process (held join
replies, timers, pid watching, the offsets store); ``server.py`` is the thin ZeroMQ loop
around all of it. Run by the supervisor as
``python -m shmbroker.coordinator --data-dir D ...``.
"""
