"""The supervisor: starts, names, watches and restarts the broker's processes (docs/design/broker.md).

``lock.py`` (one broker per data dir), ``runtime.py`` (the runtime file), ``backoff.py``
(restart policy, plain logic), ``supervisor.py`` (the process loop), ``naming.py`` and
``lifecycle.py`` (what every child does at start). Kept free of heavy imports: every child
imports this package.
"""
