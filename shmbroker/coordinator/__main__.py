"""``python -m shmbroker.coordinator``: started by the supervisor."""
import sys

from .process import main

sys.exit(main())
