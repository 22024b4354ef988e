"""``python -m shmbroker.partition``: started by the supervisor, one per partition."""
import sys

from .process import main

sys.exit(main())
