"""``python -m ditq``: the same command line as the ``ditq`` console script."""
import sys

from .cli import main

sys.exit(main())
