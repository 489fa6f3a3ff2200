"""A WebSocket-to-TCP bridge in front of a broker that has no WebSocket listener.

mosquitto as installed here cannot listen for WebSockets, so tests that use
``transport="websockets"`` point the client at a :class:`WsBridge`: an asyncio server on a free
127.0.0.1 port that does the server side of the upgrade with wsproto (independently of the
client's code in ``mqtt_persist/websocket.py``), requires the subprotocol ``mqtt``, and relays
the payload of binary frames to the target's TCP port and the target's bytes back as binary
frames. Like :class:`tests.support.proxy.FaultProxy` it can break things:

* :attr:`refuse_status` answers every upgrade with that HTTP status (403, 404, 503...);
* :attr:`answer_subprotocol` accepts the upgrade naming another subprotocol than ``mqtt``
  (``""``: naming none);
* :meth:`cut` aborts every open connection, both sides, without a close frame (a network loss);
* :attr:`max_frame` splits what it sends into binary frames of at most that many bytes, so an
  MQTT packet spans frames; :attr:`trickle` writes each frame a few bytes at a time with a
  pause between, so the client's reads end inside a frame's header or payload.

It records :attr:`requests` (path, headers, offered subprotocols of each upgrade),
:attr:`close_codes` (the close frames clients sent) and :attr:`pings_answered`.
With ``tls=`` (an ``ssl.SSLContext``) it serves ``wss://``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Self

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from tests.support.loop_thread import OnItsOwnLoop

__all__ = ["ThreadedBridge", "UpgradeRequest", "WsBridge"]

_CHUNK = 65536


@dataclass(frozen=True)
class UpgradeRequest:
    """One upgrade request as the bridge saw it (header names lower-case)."""

    path: str
    headers: dict[str, str]
    subprotocols: list[str]


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class WsBridge:
    """See the module docstring. ``async with WsBridge(host, port) as bridge``."""

    host = "127.0.0.1"

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        path: str = "/mqtt",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.path = path
        self.tls = tls
        # Bound now, so the port is known (and connections wait in the backlog) before start().
        self._sock = socket.create_server((self.host, 0))
        self.port: int = self._sock.getsockname()[1]
        self.refuse_status: int | None = None
        self.answer_subprotocol: str | None = None
        self.max_frame: int | None = None
        self.trickle: int | None = None
        self.requests: list[UpgradeRequest] = []
        self.close_codes: list[int] = []
        self.pings_answered = 0
        self.connections = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock, ssl=self.tls)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for link in list(self._links):
            link.abort()
            for task in link.tasks:
                task.cancel()
        self._links.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def cut(self) -> None:
        """Abort every open connection, both sides, without a close frame."""
        for link in list(self._links):
            link.abort()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # --- one connection ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            ws = WSConnection(ConnectionType.SERVER)
            request = await self._read_request(reader, ws)
            if request is None:
                return
            upstream = await self._answer(request, ws, writer)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            link.upstream = up_writer
            down = asyncio.ensure_future(self._downstream(up_reader, ws, link))
            link.tasks.append(down)
            try:
                await self._upstream(reader, ws, writer, up_writer)
            finally:
                down.cancel()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._links.discard(link)
            link.abort()

    async def _read_request(self, reader: asyncio.StreamReader, ws: WSConnection) -> Request | None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return None
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    headers = {k.decode().lower(): v.decode() for k, v in event.extra_headers}
                    headers["host"] = event.host
                    self.requests.append(
                        UpgradeRequest(event.target, headers, list(event.subprotocols))
                    )
                    return event

    async def _answer(
        self, request: Request, ws: WSConnection, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Accept the upgrade and return the connection to the target, or refuse it (None).

        The target is connected first, and a target that is down gets 502 (as nginx answers),
        so a client sees a broker that is down as a refused upgrade, not as a WebSocket that
        closes after CONNECT.
        """
        status = self.refuse_status
        reason = b"refused by the test bridge"
        upstream = None
        if status is None and request.target != self.path:
            status, reason = 404, b"no such path"
        elif status is None and "mqtt" not in request.subprotocols:
            status, reason = 400, b"subprotocol mqtt required"
        elif status is None:
            try:
                upstream = await asyncio.open_connection(*self.target)
            except OSError:
                status, reason = 502, b"the broker is not reachable"
        if status is not None:
            writer.write(
                ws.send(RejectConnection(status_code=status, has_body=True,
                                         headers=[(b"content-type", b"text/plain")]))
                + ws.send(RejectData(data=reason, body_finished=True))
            )  # fmt: skip
            await writer.drain()
            return None
        assert upstream is not None
        if self.answer_subprotocol is not None:
            # wsproto will not accept with a subprotocol the client did not offer: by hand.
            # "" accepts without naming any.
            chosen = self.answer_subprotocol.encode()
            protocol = b"Sec-WebSocket-Protocol: " + chosen + b"\r\n" if chosen else b""
            key = next(v for k, v in request.extra_headers if k.lower() == b"sec-websocket-key")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + generate_accept_token(key)
                + b"\r\n" + protocol + b"\r\n"
            )  # fmt: skip
            await writer.drain()
            upstream[1].transport.abort()
            return None
        writer.write(ws.send(AcceptConnection(subprotocol="mqtt")))
        await writer.drain()
        return upstream

    async def _upstream(
        self,
        reader: asyncio.StreamReader,
        ws: WSConnection,
        writer: asyncio.StreamWriter,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Client frames to broker bytes, until the client closes or goes away."""
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    up_writer.write(event.data)
                    await up_writer.drain()
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                    self.pings_answered += 1
                elif isinstance(event, CloseConnection):
                    self.close_codes.append(event.code)
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        writer.write(ws.send(event.response()))
                        await writer.drain()
                    return
                elif isinstance(event, TextMessage):
                    writer.write(ws.send(CloseConnection(code=1003)))
                    await writer.drain()
                    return
                elif isinstance(event, Pong):
                    pass

    async def _downstream(
        self, up_reader: asyncio.StreamReader, ws: WSConnection, link: _Link
    ) -> None:
        """Broker bytes to binary frames; the broker closing is a normal WebSocket close, a
        reset of the broker's side resets the client's too (a network loss, as it would be)."""
        writer = link.client
        try:
            while True:
                data = await up_reader.read(_CHUNK)
                if not data:
                    if ws.state is ConnectionState.OPEN:
                        await self._write(writer, ws.send(CloseConnection(code=1000)))
                    return
                size = self.max_frame or len(data)
                for offset in range(0, len(data), size):
                    frame = ws.send(BytesMessage(data=data[offset : offset + size]))
                    await self._write(writer, frame)
        except (OSError, ConnectionError):
            link.abort()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        step = self.trickle
        if step is None:
            writer.write(data)
            await writer.drain()
            return
        for offset in range(0, len(data), step):
            writer.write(data[offset : offset + step])
            await writer.drain()
            await asyncio.sleep(0.002)


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization`` header value, for the header tests."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ThreadedBridge(OnItsOwnLoop[WsBridge]):
    """A :class:`WsBridge` on an event loop of its own thread, for synchronous tests (the
    crash test's child processes connect to ``bridge.port``)."""

    host = WsBridge.host

    def __init__(self, target_host: str, target_port: int, **kwargs: Any) -> None:
        super().__init__(WsBridge(target_host, target_port, **kwargs))
        self.bridge = self.server

    @property
    def port(self) -> int:
        return self.bridge.port
