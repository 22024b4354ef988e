"""The coordinator process: topic metadata, and consumer groups (issue 4, being wired in).

``topics.py`` (rules, registry, its file), ``protocol.py`` (the request format),
``group.py`` (one group's membership state machine), ``assignors.py`` (range, round-robin,
cooperative-sticky) and ``offsets.py`` (committed offsets in ``__consumer_offsets-0``) are
plain code with an injected clock; ``server.py`` is the thin ZeroMQ
loop around them (groups are not served by it yet). Run by the supervisor as
``python -m shmbroker.coordinator --data-dir D ...``.
"""
