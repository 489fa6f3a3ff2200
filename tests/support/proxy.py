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

With ``mqtt=True`` the proxy also reads the stream as MQTT packets (:mod:`tests.support.wire`,
independent of the library's codec) and forwards whole packets only:

* :attr:`FaultProxy.packets` records every packet that crossed, both directions, in order;
* :meth:`FaultProxy.drop_packets` drops chosen packets (say the client's PUBREC, or the
  broker's PUBACK and PUBCOMP) while forwarding the rest;
* :meth:`FaultProxy.on_packet` calls a function for every packet as it arrives, before it is
  forwarded (a function may :meth:`cut` right there: that packet is then not forwarded);
* :meth:`FaultProxy.settle` waits until the proxy has read and handled every byte either side
  has written so far.

:meth:`FaultProxy.stall` can also hold one direction only, or only the connections open now.

Only the event loop that ran :meth:`start` may call the methods; everything is torn down by
:meth:`close` (or ``async with``), which cancels every task the proxy created.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import termios
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

from tests.support.loop_thread import OnItsOwnLoop
from tests.support.wire import Framer, WirePacket, connect_level, packet_type, parse

if TYPE_CHECKING:
    from tests.support.broker import MosquittoBroker

__all__ = ["Direction", "FaultProxy", "PacketRule", "ProxyFactory", "ThreadedProxy"]

Direction = Literal["up", "down"]
_DIRECTIONS: tuple[Direction, Direction] = ("up", "down")


class ProxyFactory(Protocol):
    """Type of the ``proxy_factory`` fixture: ``await proxy_factory(broker)`` or
    ``await proxy_factory((host, port), mqtt=True)``."""

    async def __call__(
        self, target: MosquittoBroker | tuple[str, int], *, mqtt: bool = False
    ) -> FaultProxy: ...


PacketListener = Callable[[WirePacket], None]
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
    #: Directions held by a stall of this connection only (``stall(..., only_open=True)``).
    held: set[str] = field(default_factory=set)
    #: Per direction: the pump has bytes in hand that it has not forwarded yet.
    busy: dict[str, bool] = field(default_factory=lambda: {"up": False, "down": False})
    readers: dict[str, asyncio.StreamReader] = field(default_factory=dict)
    framers: dict[str, Framer] = field(default_factory=dict)

    def abort(self) -> None:
        self.closed = True
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()


@dataclass(eq=False)
class PacketRule:
    """Drop the packets of ``types`` going ``direction`` (that ``match`` accepts, if given).

    ``limit`` drops at most that many and then lets everything through; ``hits`` counts the
    packets dropped so far. :meth:`remove` (or ``FaultProxy.clear_rules()``) disarms it.
    """

    direction: Direction
    types: frozenset[int]
    match: Callable[[WirePacket], bool] | None = None
    limit: int | None = None
    hits: int = 0
    active: bool = True

    def wants(self, packet: WirePacket) -> bool:
        if not self.active or packet.direction != self.direction or packet.type not in self.types:
            return False
        if self.limit is not None and self.hits >= self.limit:
            return False
        return self.match is None or self.match(packet)

    def remove(self) -> None:
        self.active = False


class FaultProxy:
    """TCP proxy from ``127.0.0.1:port`` to ``target_host:target_port`` with fault injection."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, *, mqtt: bool = False) -> None:
        self.target_host = target_host
        self.target_port = target_port
        #: Read the streams as MQTT packets (record, drop, listen); see the module docstring.
        self.mqtt = mqtt
        #: Every packet that crossed (``mqtt=True``), both directions, in the order read.
        self.packets: list[WirePacket] = []
        self._rules: list[PacketRule] = []
        self._listeners: list[PacketListener] = []
        self._stalled: set[str] = set()
        self.port: int = 0
        self.total_connections = 0
        self.refused_connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
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
        self._stalled.clear()
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
    def cut(self, links: Iterable[int] | None = None) -> int:
        """Abort every open connection (or those numbered ``links``), both sides, at once.

        Connections are numbered from 1 in the order accepted (``WirePacket.link``). Returns
        how many were cut.
        """
        chosen = None if links is None else set(links)
        victims = [link for link in self._links if chosen is None or link.number in chosen]
        for link in victims:
            self._drop_link(link)
        return len(victims)

    def stall(
        self, on: bool, direction: Direction | None = None, *, only_open: bool = False
    ) -> None:
        """Hold (True) or resume (False) forwarding; nothing is dropped.

        ``direction`` holds one way only (None: both). ``only_open=True`` holds the
        connections open now and lets later ones flow (a client that gave up on a
        black-holed connection gets through on its next one); resuming with it releases them.
        """
        directions = _DIRECTIONS if direction is None else (direction,)
        for d in directions:
            if d not in _DIRECTIONS:
                raise ValueError(f"direction must be 'up' or 'down', not {d!r}")
        if only_open:
            for link in self._links:
                if on:
                    link.held.update(directions)
                else:
                    link.held.difference_update(directions)
        elif on:
            self._stalled.update(directions)
        else:
            self._stalled.difference_update(directions)
            for link in self._links:
                link.held.difference_update(directions)

    @property
    def stalled(self) -> bool:
        """True while any direction of any connection is held."""
        return bool(self._stalled) or any(link.held for link in self._links)

    def drop_packets(
        self,
        direction: Direction,
        *types: str | int,
        match: Callable[[WirePacket], bool] | None = None,
        limit: int | None = None,
    ) -> PacketRule:
        """Drop packets of ``types`` going ``direction`` on every connection (``mqtt=True``).

        For example ``drop_packets("up", "PUBACK", "PUBREC", "PUBCOMP")`` loses the client's
        acknowledgements of inbound messages, ``drop_packets("down", "PUBACK", "PUBCOMP")``
        the broker's final acknowledgements. Returns the rule (``rule.remove()`` disarms it).
        """
        if not self.mqtt:
            raise RuntimeError("drop_packets needs a FaultProxy(..., mqtt=True)")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        if not types:
            raise ValueError("name at least one packet type")
        rule = PacketRule(direction, frozenset(packet_type(t) for t in types), match, limit)
        self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Disarm every :meth:`drop_packets` rule."""
        for rule in self._rules:
            rule.remove()
        self._rules.clear()

    def on_packet(self, listener: PacketListener) -> Callable[[], None]:
        """Call ``listener(packet)`` for every packet read (``mqtt=True``), before forwarding it.

        Returns a function that removes the listener. A listener runs inside the proxy's pump:
        it must not block; it may call :meth:`cut`, :meth:`stall` or :meth:`drop_after`.
        """
        if not self.mqtt:
            raise RuntimeError("on_packet needs a FaultProxy(..., mqtt=True)")
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every byte written to the proxy so far has been read and handled.

        "Handled": forwarded, dropped, or held by a stall. On loopback a byte a peer has
        written is in the proxy's socket before the peer's ``send`` returns, so after this
        returns nothing that either side wrote before the call is still on its way to the
        proxy's packet listeners. TimeoutError if the proxy does not get there in time.
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        # Twice in a row: a pump that just forwarded may have woken the other side's reader.
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} did not settle within {timeout}s")
            await asyncio.sleep(0)
            quiet = quiet + 1 if all(self._link_idle(link) for link in self._links) else 0

    def _link_idle(self, link: _Link) -> bool:
        if link.closed:
            return True
        if link.upstream_writer is None:
            return False  # still connecting to the target: the client's bytes wait unread
        for direction in _DIRECTIONS:
            reader = link.readers.get(direction)
            if reader is None:
                continue
            held = direction in self._stalled or direction in link.held
            if link.busy[direction] and not held:
                return False
            if len(getattr(reader, "_buffer", b"")) and not held:
                return False
            transport = getattr(reader, "_transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None and not held and _unread(sock.fileno()):
                return False
        return True

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
    def open_links(self) -> list[int]:
        """Numbers of the connections open now."""
        return sorted(link.number for link in self._links if not link.closed)

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
            link.readers = {"up": reader, "down": up_reader}
            if self.mqtt:
                link.framers = {"up": Framer(), "down": Framer()}
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
        framer = link.framers.get(direction)
        try:
            while not link.closed:
                link.busy[direction] = False
                data = await reader.read(_CHUNK)
                link.busy[direction] = True
                if not data:
                    break  # EOF: close the whole link (MQTT has no use for half-close)
                # Stall: hold the bytes we have and read no more until resumed (polling so
                # that a cut during a stall still ends this pump promptly).
                # stall() sets plain flags (it may run inside a packet listener), hence the poll.
                while (direction in self._stalled or direction in link.held) and not link.closed:  # noqa: ASYNC110
                    await asyncio.sleep(_STALL_POLL)
                if link.closed:
                    return
                if framer is not None:
                    data = self._inspect(link, direction, framer, data)
                    if link.closed:
                        return
                    if not data:
                        continue
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

    def _inspect(self, link: _Link, direction: Direction, framer: Framer, data: bytes) -> bytes:
        """The bytes to forward: whole packets that no rule drops; a partial one waits."""
        out = bytearray()
        for raw in framer.feed(data):
            if framer.broken:  # not MQTT (any more): pass it through untouched
                out += raw
                continue
            level = connect_level(raw)
            if level is not None:
                for f in link.framers.values():
                    f.level = level
            packet = parse(
                raw, link=link.number, direction=direction, index=len(self.packets),
                level=framer.level,
            )  # fmt: skip
            self.packets.append(packet)
            for listener in list(self._listeners):
                listener(packet)
            if link.closed:
                break
            for rule in self._rules:
                if rule.wants(packet):
                    rule.hits += 1
                    break
            else:
                out += raw
        return bytes(out)

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


def _unread(fd: int) -> int:
    """Bytes waiting in a socket's receive queue."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


class ThreadedProxy(OnItsOwnLoop[FaultProxy]):
    """A :class:`FaultProxy` running on an event loop of its own thread, for synchronous tests.

    ``with ThreadedProxy(host, port, mqtt=True) as proxy:`` points child processes at
    ``proxy.port``; :meth:`packets` is a snapshot of what crossed so far. Faults are for the
    proxy's own loop (``proxy.call(lambda p: p.cut())``).
    """

    host = FaultProxy.host

    def __init__(self, target_host: str, target_port: int, *, mqtt: bool = False) -> None:
        super().__init__(FaultProxy(target_host, target_port, mqtt=mqtt))
        self.proxy = self.server

    @property
    def port(self) -> int:
        return self.proxy.port

    def packets(self) -> list[WirePacket]:
        return list(self.call(lambda p: p.packets))
