"""MQTT over WebSockets (``transport="websockets"``): the framing as another byte stream.

:func:`websocket_handshake` upgrades a TCP or TLS stream opened by
:func:`~mqtt_persist.transport.open_stream` (``ws://`` or ``wss://``) and returns a
:class:`WebSocketStream`, an :class:`anyio.abc.ByteStream` like the stream it wraps, so the
connection supervisor reads and writes MQTT bytes the same way over either transport. The
WebSocket protocol itself is `wsproto <https://python-hyper.org/projects/wsproto/>`_, sans-IO
like our MQTT codec: it turns bytes into events and events into bytes, and this module does the
waiting.

What MQTT asks of the transport (MQTT 3.1.1 §6, MQTT 5 §6): subprotocol ``mqtt``, binary
frames only (a text frame closes the connection), and the frames are only a carrier: an MQTT
packet may span frames and a frame may carry several packets, so :meth:`WebSocketStream.receive`
hands out the payload bytes as they come and the MQTT decoder does the rest. Pings are answered
here; closing sends a close frame (1000) and waits briefly for the server's.

wsproto is the optional extra ``mqtt-persist[websockets]``; it is imported only when a client
uses this transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream

from mqtt_persist.errors import (
    ConnectionLost,
    InvalidInput,
    ProtocolError,
    WebSocketHandshakeFailed,
)

if TYPE_CHECKING:
    from wsproto import WSConnection

__all__ = [
    "SUBPROTOCOL",
    "WebSocketSettings",
    "WebSocketStream",
    "WebSocketUnavailable",
    "websocket_handshake",
]

#: The subprotocol MQTT 3.1.1 and MQTT 5 both register (MQTT 5 §6: "mqtt").
SUBPROTOCOL = "mqtt"
_READ_SIZE = 65536
#: How long closing waits for the server's close frame before it drops the connection.
_CLOSE_WAIT = 1.0
#: The most of a refusal's body kept for the error message.
_BODY_EXCERPT = 200


class WebSocketUnavailable(InvalidInput, ImportError):
    """``transport="websockets"`` without wsproto installed (``pip install
    'mqtt-persist[websockets]'``)."""


def _require_wsproto() -> None:
    try:
        import wsproto  # noqa: F401
    except ImportError as exc:
        raise WebSocketUnavailable(
            "transport='websockets' needs wsproto: pip install 'mqtt-persist[websockets]'"
        ) from exc


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """Where and how to upgrade: the request path and extra headers (e.g. an auth token for a
    proxy). Validated on creation; raises :class:`~mqtt_persist.errors.InvalidInput`."""

    path: str = "/mqtt"
    #: Left out of the repr: a header may carry a credential.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise InvalidInput(f"websocket_path must start with '/', not {self.path!r}")
        if any(ord(c) <= 32 or ord(c) >= 127 for c in self.path):
            raise InvalidInput(
                f"websocket_path must be URL-encoded ASCII without spaces, not {self.path!r}"
            )
        for name, value in self.headers:
            if not name or any(c in name for c in ' \t\r\n:"(),/;<=>?@[\\]{}'):
                raise InvalidInput(f"websocket_headers: invalid header name {name!r}")
            if any(c in value for c in "\r\n\0"):
                raise InvalidInput(f"websocket_headers: invalid value for {name!r}")
        _require_wsproto()

    @classmethod
    def of(
        cls, path: str, headers: Mapping[str, str] | Sequence[tuple[str, str]] | None
    ) -> WebSocketSettings:
        """Settings from the client's ``websocket_path`` and ``websocket_headers``."""
        items = headers.items() if isinstance(headers, Mapping) else (headers or ())
        return cls(path=path, headers=tuple((str(k), str(v)) for k, v in items))


def websocket_url(hostname: str, port: int, path: str, *, tls: bool) -> str:
    """``ws://host:port/path`` (``wss://`` with TLS), for messages and errors."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{'wss' if tls else 'ws'}://{host}:{port}{path}"


async def websocket_handshake(
    stream: ByteStream, hostname: str, port: int, settings: WebSocketSettings, *, tls: bool
) -> WebSocketStream:
    """Upgrade ``stream`` to a WebSocket speaking ``mqtt``; the caller bounds the time.

    Raises :class:`~mqtt_persist.errors.WebSocketHandshakeFailed` when the server refuses
    (an HTTP status other than 101) or answers with another subprotocol, and
    :class:`~mqtt_persist.errors.ConnectionLost` when it closes the connection first.
    """
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
    from wsproto.utilities import RemoteProtocolError

    url = websocket_url(hostname, port, settings.path, tls=tls)
    default_port = 443 if tls else 80
    host = f"[{hostname}]" if ":" in hostname else hostname
    host_header = host if port == default_port else f"{host}:{port}"
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=host_header,
        target=settings.path,
        subprotocols=[SUBPROTOCOL],
        extra_headers=[(k.encode(), v.encode()) for k, v in settings.headers],
    )
    await stream.send(ws.send(request))
    status: int | None = None
    body = b""
    while True:
        try:
            data = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            if status is not None:  # a refusal whose body ran until the connection closed
                raise WebSocketHandshakeFailed(
                    url, _excerpt(body) or "refused", status_code=status
                ) from None
            # Typed and named, for reconnect=False; the supervisor retries it like any loss.
            raise ConnectionLost(
                f"{url} closed the connection during the WebSocket upgrade"
            ) from exc
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    if event.subprotocol != SUBPROTOCOL:
                        # wsproto itself refuses a subprotocol we did not offer; this is none.
                        raise WebSocketHandshakeFailed(
                            url, "the server accepted without the subprotocol 'mqtt'"
                        )
                    return WebSocketStream(stream, ws, url)
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise WebSocketHandshakeFailed(url, "refused", status_code=status)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) > _BODY_EXCERPT:
                        raise WebSocketHandshakeFailed(
                            url, _excerpt(body) or "refused", status_code=status
                        )
        except RemoteProtocolError as exc:
            raise WebSocketHandshakeFailed(url, str(exc), status_code=status) from None


def _excerpt(body: bytes) -> str:
    text = body[:_BODY_EXCERPT].decode("utf-8", "replace")
    return " ".join(text.split())


class WebSocketStream(ByteStream):
    """MQTT bytes over an open WebSocket: binary frames out, frame payloads in.

    Only one task may receive at a time, as with any anyio stream; sends are serialised here,
    since :meth:`receive` answers pings on the same underlying stream. The reader never waits
    for a send under way: its answers go out with the next write. Over plain TCP on asyncio
    (:class:`~mqtt_persist.transport.TcpStream`) it never waits for a write of its own either:
    it hands its answers to the transport without waiting, or leaves them to the next write
    when much is still unwritten (the peer is not reading). Over other streams (TLS, other
    event loops), with no send under way, it writes them itself.
    """

    def __init__(self, stream: ByteStream, ws: WSConnection, url: str) -> None:
        self._stream = stream
        self._ws = ws
        self.url = url
        self._buffer = bytearray()
        self._send_lock = anyio.Lock()
        # Control frames (a pong, the answer to the server's close) from the reader that a
        # send under way, or a full buffer, kept it from writing: the next write takes them.
        # Waiting to write them instead would stop the reading while the server may be the
        # one waiting for us to read. Only the latest pong is kept (RFC 6455 §5.5.3), so a
        # server that pings without reading cannot make them pile up.
        self._pong = b""
        self._control: list[bytes] = []
        # TcpStream's write that never waits; None: the stream has none.
        self._send_nowait: Callable[[bytes], bool] | None = getattr(stream, "send_nowait", None)
        self._peer_closed = False
        self._receiving = False
        # What came in the same read as the server's 101 (a ping, say) waits in wsproto.
        self._unread = True

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        """Payload bytes of binary frames, as they arrive (frame boundaries are not kept).

        Raises :class:`anyio.EndOfStream` once the server closed the WebSocket, and
        :class:`~mqtt_persist.errors.ProtocolError` on a text frame (MQTT allows binary only).
        """
        self._receiving = True
        try:
            if self._unread:
                self._unread = False
                await self._handle_events()
            while not self._buffer:
                if self._peer_closed:
                    raise anyio.EndOfStream
                data = await self._stream.receive(_READ_SIZE)
                self._ws.receive_data(data)
                await self._handle_events()
                self._flush_control_nowait()  # left over while the server was not reading
        finally:
            self._receiving = False
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return chunk

    async def _handle_events(self) -> None:
        from wsproto.connection import ConnectionState
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._buffer += event.data
            elif isinstance(event, Ping):
                # Not once our close frame is out (aclose() from another task): wsproto
                # refuses a pong then, and the server expects only its close answered.
                if self._ws.state is ConnectionState.OPEN:
                    self._pong = self._ws.send(event.response())
                    await self._send_control()
            elif isinstance(event, CloseConnection):
                self._peer_closed = True
                if self._can_send():
                    # Answer the server's close: the closing handshake is then complete.
                    with contextlib.suppress(Exception):
                        self._control.append(self._ws.send(event.response()))
                        await self._send_control()
            elif isinstance(event, TextMessage):
                raise ProtocolError(f"{self.url} sent a text frame; MQTT over WebSockets is binary")

    def _can_send(self) -> bool:
        from wsproto.connection import ConnectionState

        return self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)

    async def _send_control(self) -> None:
        """Write the pending control frames, unless that could mean waiting for the server."""
        if self._send_lock.locked():
            return  # the send under way writes them next
        if self._send_nowait is not None:
            self._flush_control_nowait()  # what stays pending goes with the next write
        else:
            async with self._send_lock:
                await self._send_pending_control()

    def _flush_control_nowait(self) -> None:
        if self._send_nowait is None or self._send_lock.locked():
            return
        control = self._pending_control()
        if control and self._send_nowait(control):
            self._pong = b""
            self._control.clear()

    def _pending_control(self) -> bytes:
        # The pong first: once the answer to the server's close is queued, no pong follows.
        return self._pong + b"".join(self._control)

    def _take_control(self) -> bytes:
        control = self._pending_control()
        self._pong = b""
        self._control.clear()
        return control

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            # Pending control frames first, in the same write: they have waited long enough.
            control = self._take_control()
            await self._stream.send(control + data if control else data)
            await self._send_pending_control()

    async def _send_pending_control(self) -> None:
        """With the send lock held. No checkpoint between the last look and the lock's
        release: nothing is left behind."""
        while control := self._take_control():
            await self._stream.send(control)

    async def send(self, item: bytes) -> None:
        """Send ``item`` as one binary message (a frame may hold several MQTT packets)."""
        from wsproto.events import BytesMessage

        if not self._can_send():
            raise anyio.ClosedResourceError
        await self._send_raw(self._ws.send(BytesMessage(data=item)))

    async def send_eof(self) -> None:
        """Half-closing is not part of the WebSocket protocol."""
        raise NotImplementedError("WebSockets cannot half-close")

    async def aclose(self) -> None:
        """Send a close frame (1000), wait up to a second for the server's, then close."""
        from wsproto.connection import ConnectionState
        from wsproto.events import CloseConnection

        try:
            if self._ws.state is ConnectionState.OPEN:
                with anyio.move_on_after(_CLOSE_WAIT), contextlib.suppress(Exception):
                    await self._send_raw(self._ws.send(CloseConnection(code=1000)))
                    # A reader still running will see the server's answer itself; otherwise
                    # read it here, so the server does not log an abnormal closure.
                    while not self._receiving and not self._peer_closed:
                        self._ws.receive_data(await self._stream.receive(_READ_SIZE))
                        await self._handle_events()
            elif self._pending_control():
                # The answer to the server's close waits behind a send under way, or for the
                # server to read what it left unread: as long.
                with anyio.move_on_after(_CLOSE_WAIT), contextlib.suppress(Exception):
                    async with self._send_lock:
                        await self._send_pending_control()
        finally:
            await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The wrapped stream's attributes (socket, TLS details)."""
        return self._stream.extra_attributes
