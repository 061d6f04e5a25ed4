"""Subcommands of the ``wmss`` command line (see ``wmss.cli``)."""
