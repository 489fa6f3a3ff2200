"""File-system pieces shared by the stores that live in local files (FileStore, SQLiteStore).

Everything here blocks: call it from the store's worker thread (see ``_worker``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re

from mqtt_persist.stores._quarantine import quarantine_stamp

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def file_base(client_id: str) -> str:
    """A file name for any client id: readable, safe, and distinct.

    Up to 40 characters of the id with everything outside ``[A-Za-z0-9_-]`` replaced, plus 32
    hex digits of its SHA-256: safe for any Unicode, ``/``, ``..`` or very long ids, distinct on
    case-insensitive file systems, and still recognisable in a directory listing.
    """
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    readable = _UNSAFE_NAME_CHARS.sub("_", client_id[:40])
    return f"{readable}-{digest}" if readable else digest


def flock(path: str) -> int | None:
    """``flock`` the lock file at ``path``: its descriptor, or None while someone else holds it.

    The lock dies with the process that holds it, which is what lets a SIGKILLed client's
    successor take over at once.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # A releaser may have unlinked the file between our open and our flock: we would then
        # hold an orphan inode nobody else can see, so start over on the current file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        locked = os.fstat(fd)
        if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
            return fd
        os.close(fd)


def unlock(fd: int, path: str, remove: bool) -> None:
    """Release a lock; ``remove`` unlinks the file first, while it is still held (see flock)."""
    try:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


# macOS's fsync() stops at the drive's cache; F_FULLFSYNC reaches the medium.
_FULL_FSYNC: int | None = getattr(fcntl, "F_FULLFSYNC", None)


def fsync_fd(fd: int) -> None:
    """Make what was written to ``fd`` durable, down to the medium."""
    full_fsync = _FULL_FSYNC
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass
    os.fsync(fd)


def datasync_fd(fd: int) -> None:
    """Make the data written to ``fd`` durable, with the metadata needed to read it back.

    ``fdatasync`` where there is one (Linux): for an append it flushes the new size too, but
    skips what reading does not need (times). Elsewhere :func:`fsync_fd`.
    """
    if _FULL_FSYNC is not None or not hasattr(os, "fdatasync"):
        fsync_fd(fd)  # macOS has F_FULLFSYNC, which reaches the medium; fdatasync does not
        return
    os.fdatasync(fd)


def fsync_directory(path: str) -> None:
    """Make the names in a directory durable (a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def make_private_directory(path: str, *, sync: bool = True) -> bool:
    """Create ``path`` (and missing parents) with mode 0700; True if it did not exist yet.

    With ``sync``, a new directory's name is made durable in its parent.
    """
    if os.path.isdir(path):
        return False
    os.makedirs(path, mode=0o700, exist_ok=True)
    if sync:
        fsync_directory(os.path.dirname(path))
    return True


def quarantine_target(path: str, companions: tuple[str, ...] = ("",)) -> str:
    """A free ``<path>.corrupt-<UTC timestamp>[-n]`` name to move damaged data to.

    ``companions`` are suffixes of files that move along (SQLite's ``-wal``/``-shm``); the name
    is free only if none of them exists yet, so nothing quarantined earlier is overwritten.
    """
    stamp = quarantine_stamp()
    target = f"{path}.corrupt-{stamp}"
    suffix = 0
    while any(os.path.lexists(target + extra) for extra in companions):
        suffix += 1
        target = f"{path}.corrupt-{stamp}-{suffix}"
    return target
