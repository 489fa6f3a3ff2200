"""An asyncio TCP proxy between a client under test and a broker, for fault injection.

Point the client at ``127.0.0.1:proxy.port`` instead of the broker, then break things:

* :meth:`FaultProxy.cut` aborts every open connection at once, both sides (the client sees a
  reset/EOF exactly like a network loss; the broker sees its client vanish, so it publishes
  the will and keeps a persistent session).
* :meth:`FaultProxy.stall` stops forwarding in both directions without closing anything.
  Bytes are **held, never dropped**: what the proxy already read is kept and the rest waits
  in the kernel socket buffers (TCP flow control pushes back on the sender); on
  ``stall(False)`` everything is delivered in order. A stall therefore looks like a black-holed
  network path: keepalive timers on both ends keep running.
* :meth:`FaultProxy.refuse` makes new connections get accepted and aborted immediately (RST),
  which a client sees as a broker that is down. Open connections are left alone.
* :meth:`FaultProxy.drop_after` cuts after exactly ``n`` more bytes have been forwarded in one
  direction (``"up"`` = client to broker, ``"down"`` = broker to client). It applies to every
  currently open connection, or, if none is open, to the next accepted one (``persistent=True``
  applies it to every future connection until ``drop_after(None)``). The ``n`` bytes are
  delivered before the cut.

Only the event loop that ran :meth:`start` may call the methods; everything is torn down by
:meth:`close` (or ``async with``), which cancels every task the proxy created.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

if TYPE_CHECKING:
    from tests.support.broker import MosquittoBroker

__all__ = ["Direction", "FaultProxy", "ProxyFactory"]

Direction = Literal["up", "down"]
#: Type of the ``proxy_factory`` fixture: ``await proxy_factory(broker)`` or
#: ``await proxy_factory((host, port))``.
ProxyFactory = Callable[["MosquittoBroker | tuple[str, int]"], Awaitable["FaultProxy"]]
_CHUNK = 65536
_POLL = 0.005
_STALL_POLL = 0.02


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side and the broker side."""

    number: int
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    # Remaining bytes allowed per direction before the link is cut (None = unlimited).
    budget: dict[str, int | None] = field(default_factory=lambda: {"up": None, "down": None})
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False

    def abort(self) -> None:
        self.closed = True
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()


class FaultProxy:
    """TCP proxy from ``127.0.0.1:port`` to ``target_host:target_port`` with fault injection."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port: int = 0
        self.total_connections = 0
        self.refused_connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._pending_drop: tuple[Direction, int] | None = None
        self._persistent_drop: tuple[Direction, int] | None = None
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on a free 127.0.0.1 port, or on the same port again after :meth:`close`.

        ``close()`` then ``start()`` is the way to get a real ``ECONNREFUSED`` (nothing
        listening) on the address the client already knows, unlike :meth:`refuse`.
        """
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(self._accept, self.host, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, abort every connection, cancel and await every task."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._flowing.set()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        # Let connection handlers that asyncio scheduled but that never ran see the closed
        # server and return, so that no task is left pending when the loop closes.
        for _ in range(3):
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    # -- faults ----------------------------------------------------------------------------
    def cut(self) -> int:
        """Abort every open connection, both sides, at once. Returns how many were cut."""
        links = list(self._links)
        for link in links:
            self._drop_link(link)
        return len(links)

    def stall(self, on: bool) -> None:
        """Hold (True) or resume (False) forwarding in both directions; nothing is dropped."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def refuse(self, on: bool) -> None:
        """While on, new connections are accepted and aborted at once (a broker that is down)."""
        self._refusing = on

    def drop_after(
        self, n_bytes: int | None, direction: Direction = "up", *, persistent: bool = False
    ) -> None:
        """Cut after ``n_bytes`` more bytes were forwarded in ``direction``.

        Applies to all open connections if there are any, otherwise to the next accepted one;
        with ``persistent=True`` also to every later connection. ``None`` disarms everything.
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        if n_bytes is None:
            self._pending_drop = self._persistent_drop = None
            for link in self._links:
                link.budget = {"up": None, "down": None}
            return
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        rule = (direction, n_bytes)
        self._persistent_drop = rule if persistent else None
        open_links = [link for link in self._links if not link.closed]
        if open_links:
            for link in open_links:
                link.budget[direction] = n_bytes
                if n_bytes == 0:
                    self._drop_link(link)
        elif not persistent:
            self._pending_drop = rule

    # -- observation -------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Connections currently open (accepted and not yet closed)."""
        return sum(1 for link in self._links if not link.closed)

    async def wait_connections(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` connections are open; False on timeout."""
        return await self._wait(lambda: self.connections >= n, timeout)

    async def wait_total_connections(
        self,
        n: int,
        timeout: float = 10.0,
    ) -> bool:
        """Wait until at least ``n`` connections were accepted in total; False on timeout."""
        return await self._wait(lambda: self.total_connections >= n, timeout)

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
        return True

    def _notify(self) -> None:
        self._changed.set()

    # -- internals -----------------------------------------------------------------------------
    def _track(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def _drop_link(self, link: _Link) -> None:
        link.abort()
        self._links.discard(link)
        self._notify()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._track()
        self.total_connections += 1
        link = _Link(number=self.total_connections, client_writer=writer)
        try:
            if self._refusing or self._server is None:
                self.refused_connections += 1
                link.abort()
                return
            if self._pending_drop is not None:
                direction, n = self._pending_drop
                self._pending_drop = None
                link.budget[direction] = n
            if self._persistent_drop is not None:
                direction, n = self._persistent_drop
                link.budget[direction] = n
            self._links.add(link)
            self._notify()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._drop_link(link)
                return
            link.upstream_writer = up_writer
            if link.closed:  # cut while we were connecting
                up_writer.transport.abort()
                return
            if link.budget["up"] == 0 or link.budget["down"] == 0:
                self._drop_link(link)
                return
            await asyncio.gather(
                self._pump(link, reader, up_writer, "up"),
                self._pump(link, up_reader, writer, "down"),
            )
        finally:
            self._drop_link(link)
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        try:
            while not link.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    break  # EOF: close the whole link (MQTT has no use for half-close)
                # Stall: hold the bytes we have and read no more until resumed (polling so
                # that a cut during a stall still ends this pump promptly).
                while not self._flowing.is_set() and not link.closed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._flowing.wait(), _STALL_POLL)
                if link.closed:
                    return
                budget = link.budget[direction]
                if budget is not None and len(data) >= budget:
                    data = data[:budget]
                    if data:
                        writer.write(data)
                        self._count(link, direction, len(data))
                    await self._flush(writer)
                    return
                writer.write(data)
                self._count(link, direction, len(data))
                if budget is not None:
                    link.budget[direction] = budget - len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._drop_link(link)

    @staticmethod
    def _count(link: _Link, direction: Direction, n: int) -> None:
        if direction == "up":
            link.bytes_up += n
        else:
            link.bytes_down += n

    @staticmethod
    async def _flush(writer: asyncio.StreamWriter, limit: float = 2.0) -> None:
        """Wait until asyncio handed every buffered byte to the kernel (abort() discards them)."""
        deadline = time.monotonic() + limit
        # asyncio has no "write buffer empty" event, so poll (ASYNC110 does not apply).
        while writer.transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL)

    def __repr__(self) -> str:
        return (
            f"<FaultProxy 127.0.0.1:{self.port} -> {self.target_host}:{self.target_port} "
            f"open={self.connections} total={self.total_connections}>"
        )
