"""Clients of a running broker: ``admin.py`` now; producer and consumer next (issue 3)."""
from .admin import Admin, TopicDescription

__all__ = ["Admin", "TopicDescription"]
