"""python -m shmbroker: the same as the `shmbroker` console script."""
import sys

from .cli import main

sys.exit(main())
