"""``python -m wmss``: the ``wmss`` command."""

import sys

from .commands import main

sys.exit(main())
