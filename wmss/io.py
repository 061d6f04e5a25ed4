"""Atomic file writes: readers (and reruns after a crash) see the old file or the new, never half.

Every file wmss writes for a user (selection scores, active sets, summaries, training state) goes
through these helpers. The data is written to a temporary file in the destination's directory
(same file system, so the final rename is atomic), flushed and ``fsync``-ed, then moved over the
destination with ``os.replace``; the directory is ``fsync``-ed afterwards (best effort) so the
rename itself survives a power loss. If anything fails, the temporary file is removed and the
previous destination, if any, is left untouched.

New files get the usual permissions (``0o666`` minus the umask), like ``open(path, "w")``. A
process killed between creating its temporary file and the rename leaves that file behind; the next
write to the same destination removes it (the temporary's name carries the writer's pid, and only
files of processes that are no longer alive are removed).

``directory_lock`` keeps two runs from writing into one directory at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from typing import Any, Iterator

__all__ = ["DirectoryInUseError", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "directory_lock"]

LOCK_FILE = ".wmss.lock"


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


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists but belongs to someone else
        return True
    return True


def _remove_orphaned_temporaries(directory: str, name: str) -> None:
    """Delete ``.name.<pid>.<hex>.tmp`` files left by writers that died mid-write."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp$")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see module doc); the directory must exist."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    _remove_orphaned_temporaries(directory, os.path.basename(path))
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


class DirectoryInUseError(OSError):
    """Another process holds the ``directory_lock`` of a directory."""


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, owner: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for the duration of the block.

    Two ``wmss train`` (or ``wmss select``) runs writing into one directory would interleave their
    files; the second one is refused at once instead. The lock is an advisory ``flock`` on
    ``directory/.wmss.lock``, which the operating system releases when the holder exits, however it
    exits (a kill included), so a crashed run never leaves a stale lock. The file records the
    holder (``owner``, pid, host) for the error message. The directory is created if needed.

    Raises:
        DirectoryInUseError: another process (or another block of this one) holds the lock.
    """
    import fcntl  # POSIX only; imported here so the rest of the module works everywhere
    import socket

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            raise DirectoryInUseError(
                f"{directory} is in use by another run ({holder or 'unknown holder'}); wait for "
                "it to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}, pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
