"""Running an asyncio test server (proxy, bridge) on an event loop of its own thread, for
synchronous tests whose clients are child processes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar


class _Server(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


S = TypeVar("S", bound=_Server)

__all__ = ["OnItsOwnLoop"]


class OnItsOwnLoop(Generic[S]):
    """``with OnItsOwnLoop(server):`` starts ``server`` on a new loop in a daemon thread and
    closes it (and the loop) on exit; :meth:`call` runs a function on that loop."""

    def __init__(self, server: S) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server = server

    def call(self, fn: Callable[[S], Any]) -> Any:
        """Run ``fn(server)`` on the server's loop and return its result."""

        async def run() -> Any:
            return fn(self.server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
