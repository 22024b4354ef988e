"""``python -m shmbroker.router``: started by the supervisor when `serve --listen` is given."""
import sys

from .process import main

sys.exit(main())
