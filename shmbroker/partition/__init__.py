"""The partition process: one OS process per partition, the only writer of that partition's log.

``owner.py`` is the plain object (open the log, do one step of work, close), ``process.py`` the
thin process loop that wires it to signals and the supervisor. Run by the supervisor as
``python -m shmbroker.partition --data-dir D --topic T --partition P ...``.
"""
from .owner import PartitionOwner

__all__ = ["PartitionOwner"]
