"""Opening a byte stream to the broker: TCP, or TLS through an ``ssl.SSLContext``, optionally
carrying MQTT over WebSockets (``ws://``, and ``wss://`` with TLS; :mod:`mqtt_persist.websocket`).
Either way the connection supervisor gets an :class:`anyio.abc.ByteStream` of MQTT bytes.

Plain TCP on asyncio uses :class:`TcpStream`, a lean ``anyio.abc.ByteStream`` over an asyncio
transport: ``send`` writes at once and returns without a trip through the event loop unless
the kernel's buffer is full, and the socket keeps being read while the reader processes what
arrived. anyio's own stream yields to the loop after every ``send`` (a cancel-shielded
checkpoint) and pauses and resumes reading around every ``receive`` that waits (two
``epoll_ctl`` calls); a sequential durable publisher pays both for every message. TLS keeps
anyio's stream (``anyio.streams.tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque

import anyio
from anyio.abc import ByteStream

from mqtt_persist.tls import tls_failure
from mqtt_persist.websocket import WebSocketSettings, websocket_handshake, websocket_url

#: Reading pauses while this much received data waits for the reader, and resumes below LOW.
_READ_HIGH = 256 * 1024
_READ_LOW = 64 * 1024
#: :meth:`TcpStream.send_nowait` takes bytes while at most this much waits to be written.
_NOWAIT_LIMIT = 64 * 1024


async def open_stream(
    hostname: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
    websocket: WebSocketSettings | None = None,
) -> ByteStream:
    """Connect within ``timeout`` seconds; raises OSError or TimeoutError otherwise, and
    :class:`~mqtt_persist.errors.TLSError` for a TLS failure that retrying cannot fix.

    With ``websocket`` the WebSocket upgrade happens within the same ``timeout`` and may raise
    :class:`~mqtt_persist.errors.WebSocketHandshakeFailed`.

    TCP_NODELAY is set on the socket: MQTT acknowledgements are tiny and latency-bound.
    """
    with anyio.fail_after(timeout):
        if tls is None:
            stream: ByteStream = (
                await TcpStream.connect(hostname, port)
                if _on_asyncio()
                else await anyio.connect_tcp(hostname, port)
            )
        else:
            try:
                stream = await anyio.connect_tcp(
                    hostname,
                    port,
                    ssl_context=tls,
                    # The certificate must name the host we were asked to connect to.
                    tls_hostname=hostname,
                    # Brokers often close TLS without close_notify; an ordinary disconnect here.
                    tls_standard_compatible=False,
                )
            except ssl.SSLError as exc:
                where = (
                    f"{hostname}:{port}"
                    if websocket is None
                    else websocket_url(hostname, port, websocket.path, tls=True)
                )
                refused = tls_failure(exc, where)
                if refused is None:
                    raise
                raise refused from exc
        if websocket is None:
            return stream
        try:
            return await websocket_handshake(stream, hostname, port, websocket, tls=tls is not None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (else anyio's own stream serves)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Protocol(asyncio.Protocol):
    """The asyncio side of :class:`TcpStream`: what arrived, and who waits for what."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.at_eof = False
        self.lost = False
        self.exception: BaseException | None = None
        self.writing_paused = False
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # As anyio's stream: send() returns once the kernel took the bytes (nothing is left
        # in a user-space buffer for a close to discard).
        transport.set_write_buffer_limits(0)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _READ_HIGH and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.at_eof = True
        self._wake_reader()
        return False  # close the transport: MQTT has no half-open connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exception = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        waiter = self.reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self.writer
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TcpStream(ByteStream):
    """A TCP connection on asyncio as an ``anyio.abc.ByteStream``, without a yield per call.

    ``receive`` returns what already arrived without a trip through the event loop (like
    ``asyncio.Queue.get`` with items waiting) and ``send`` returns at once when the kernel took
    the bytes; both wait only when they must. One task reads and one task writes at a time
    (the connection's reader and the flusher).
    """

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    @classmethod
    async def connect(cls, hostname: str, port: int) -> TcpStream:
        """Open a TCP connection (every address tried, IPv6 and IPv4 raced like anyio does)."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(
            _Protocol, hostname, port, happy_eyeballs_delay=0.25
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(transport, protocol)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        protocol = self._protocol
        chunks = protocol.chunks
        while not chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if protocol.lost and protocol.exception is not None:
                raise anyio.BrokenResourceError from protocol.exception
            if protocol.at_eof or protocol.lost:
                raise anyio.EndOfStream
            waiter = protocol.reader = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                protocol.reader = None
        chunk = chunks.popleft()
        if chunks and len(chunk) + len(chunks[0]) <= max_bytes:
            # Several reads arrived since the last receive: one chunk, one pass of the reader.
            parts = [chunk]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            chunk = b"".join(parts)
        elif len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            chunks.appendleft(rest)
        protocol.buffered -= len(chunk)
        if protocol.reading_paused and protocol.buffered <= _READ_LOW:
            protocol.reading_paused = False
            self._transport.resume_reading()
        return chunk

    async def send(self, item: bytes) -> None:
        protocol = self._protocol
        if self._closed:
            raise anyio.ClosedResourceError
        if protocol.writer is not None:
            # A second writer would take the first one's wake-up and leave it waiting forever.
            raise anyio.BusyResourceError("writing")
        if protocol.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError from protocol.exception
        self._transport.write(item)
        while protocol.writing_paused and not protocol.lost:
            waiter = protocol.writer = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                protocol.writer = None
        if self._closed:
            # aclose() from another task discarded what was waiting to be written.
            raise anyio.ClosedResourceError
        if protocol.lost and protocol.exception is not None:
            raise anyio.BrokenResourceError from protocol.exception

    def send_nowait(self, item: bytes) -> bool:
        """Hand ``item`` to the transport without waiting; it goes out as the peer reads.

        For the WebSocket reader's pongs (:class:`~mqtt_persist.websocket.WebSocketStream`),
        which must not wait for the peer to read while the peer may wait for us to read.
        False, and nothing written, while a send waits (it owns the stream), once the stream
        is closed or lost, or while more than ``_NOWAIT_LIMIT`` bytes already wait to be
        written: what the peer does not read must not pile up here.
        """
        protocol = self._protocol
        if (
            self._closed
            or protocol.writer is not None
            or protocol.lost
            or self._transport.is_closing()
            or self._transport.get_write_buffer_size() > _NOWAIT_LIMIT
        ):
            return False
        self._transport.write(item)
        return True

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._transport.write_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._transport.abort()
        protocol = self._protocol
        protocol._wake_reader()
        protocol._wake_writer()
        await anyio.lowlevel.checkpoint()
