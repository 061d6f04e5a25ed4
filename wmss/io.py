"""Atomic file writes: readers (and reruns after a crash) see the old file or the new, never half.

Every file wmss writes for a user (selection scores, active sets, summaries, training state) goes
through these helpers. The data is written to a temporary file in the destination's directory
(same file system, so the final rename is atomic), flushed and ``fsync``-ed, then moved over the
destination with ``os.replace``; the directory is ``fsync``-ed afterwards (best effort) so the
rename itself survives a power loss. If anything fails, the temporary file is removed and the
previous destination, if any, is left untouched.

New files get the usual permissions (``0o666`` minus the umask), like ``open(path, "w")``.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _fsync_directory(directory: str) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see module doc); the directory must exist."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # A hidden, unique name next to the target: same file system, never mistaken for output.
    temporary = os.path.join(directory,
                             f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber anything; mode 0o666 lets the umask decide, as open(path, "w") does.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see module doc)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as strict JSON (no NaN/Infinity, UTF-8, trailing newline) atomically.

    The whole document is serialised before the file is touched, so an object that cannot be
    written (a NaN, an unsupported type) raises ``ValueError``/``TypeError`` and leaves ``path``
    as it was.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
