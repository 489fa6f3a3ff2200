"""A safety net: no server a test started outlives the test process."""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from typing import Protocol


class Killable(Protocol):
    def kill(self) -> None: ...


class Reaper:
    """Remembers running servers and kills whatever is left at interpreter exit."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Killable] = weakref.WeakSet()
        self._lock = threading.Lock()
        atexit.register(self.kill_all)

    def add(self, server: Killable) -> None:
        with self._lock:
            self._live.add(server)

    def discard(self, server: Killable) -> None:
        with self._lock:
            self._live.discard(server)

    def kill_all(self) -> None:
        with self._lock:
            servers = list(self._live)
        for server in servers:
            with contextlib.suppress(Exception):
                server.kill()


REAPER = Reaper()
