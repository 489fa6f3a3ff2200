"""A stand-in for ``mqtt_persist.stores.file.aio``'s context whose syncs are ``os.fdatasync``
calls on a thread of its own, so tests can count, hold and fail them by patching ``os`` as they
do for the syncer thread, while the store's AIO side (``writer.LoopSyncs``) runs for real.

Use :func:`use_sync_path` to choose the path a test's FileStores take: ``"thread"`` (AIO
unavailable), ``"aio"`` (this fake) or ``"kernel"`` (real Linux AIO, where there is one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import pytest

from mqtt_persist.stores.file import aio

__all__ = ["FAKE_AIO_THREAD", "FakeAioContext", "use_sync_path"]

#: The name of the threads that run the fake's syncs.
FAKE_AIO_THREAD = "fake-aio"


class FakeAioContext:
    """What ``aio.AioContext`` offers, its syncs run by ``os.fdatasync`` on threads."""

    def __init__(self) -> None:
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._done: list[tuple[int, int]] = []
        self._arrived = threading.Condition(self._lock)
        self._pending = 0

    def in_flight(self) -> int:
        return self._pending

    def submit_fdatasync(self, fd: int, token: int) -> None:
        self._pending += 1
        threading.Thread(
            target=self._sync, args=(fd, token), name=FAKE_AIO_THREAD, daemon=True
        ).start()

    def _sync(self, fd: int, token: int) -> None:
        try:
            os.fdatasync(fd)
            result = 0
        except OSError as exc:
            result = -(exc.errno or errno.EIO)
        with self._arrived:
            self._done.append((token, result))
            # Under the lock, as close() is: the reaper may close the context as soon as it
            # saw this completion, before this thread got to signal it.
            os.eventfd_write(self.eventfd, 1)
            self._arrived.notify_all()

    def reap(self, *, wait: bool = False) -> list[tuple[int, int]]:
        with self._arrived:
            while wait and self._pending and not self._done:
                self._arrived.wait()
            done, self._done = self._done, []
        self._pending -= len(done)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.eventfd)
        return done

    def close(self) -> None:
        with self._lock:
            os.close(self.eventfd)


def use_sync_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the FileStores created from now on sync through ``path`` (see the docstring)."""
    if path == "thread":
        monkeypatch.setattr(aio, "open_context", lambda: None)
    elif path == "aio":
        monkeypatch.setattr(aio, "open_context", FakeAioContext)
    elif path == "kernel":
        if (context := aio.open_context()) is None:
            pytest.skip("no Linux AIO here")  # the other paths still run
        context.close()
    else:
        raise ValueError(path)
