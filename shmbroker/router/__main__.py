"""``python -m shmbroker.router``: started by the supervisor unless `serve --listen none`."""
import sys

from .process import main

sys.exit(main())
