"""``python -m wmss``: the ``wmss`` command."""

from .commands import console

console()
