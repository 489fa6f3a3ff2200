"""The connection supervisor: connect, CONNACK, read, keepalive, reconnect.

It owns the byte stream to the broker. Each connection: open TCP/TLS, hand the session a fresh
connection (which produces CONNECT for the flusher to send), then read and decode packets into
the session until the connection dies. Until the session has accepted a CONNACK the read runs
under a deadline of ``connect_timeout``; after it a keepalive task pings an idle link and ends
one whose broker went silent. With ``reconnect=True`` the supervisor connects again after
exponential backoff with full jitter, for as long as the client runs; with ``reconnect=False``
the first connection is the only one and losing it stops the client.

Whether a CONNACK is refused is decided by the session alone (it answers a non-zero return code
by going back to DISCONNECTED); the reader turns that decision into :class:`ConnectionRefused`,
and the supervisor decides whether retrying can help.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.signals import Signal
from mqtt_persist.errors import ConnectionLost, ConnectionRefused, KeepaliveTimeout, ProtocolError
from mqtt_persist.log import ClientLogger
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import ConnAck, ConnectReturnCode, Packet
from mqtt_persist.session.machine import ConnectionState, Session
from mqtt_persist.transport import open_stream

#: Return codes after which retrying the same CONNECT cannot succeed.
_FATAL_REFUSALS = {
    ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ConnectReturnCode.IDENTIFIER_REJECTED,
    ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
    ConnectReturnCode.NOT_AUTHORIZED,
}
_REFUSAL_TEXT = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
#: What ends one connection but not the client: the supervisor reconnects after these.
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    ConnectionLost,
    ProtocolError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
_READ_SIZE = 65536


class ConnectionSupervisor:
    """Keeps the client connected (or, with ``reconnect=False``, connected once)."""

    def __init__(
        self,
        session: Session,
        options: ClientOptions,
        *,
        log: ClientLogger,
        ready: Signal,
        wake_flusher: Callable[[], None],
        fail: Callable[[BaseException], None],
        closing: Callable[[], bool],
    ) -> None:
        self._session = session
        self._options = options
        self._log = log
        self._ready = ready
        self._wake_flusher = wake_flusher
        self._fail = fail
        self._closing = closing
        self._stream: ByteStream | None = None
        # The session's number for the current connection: packets produced for an earlier
        # one are never written to a later one.
        self._generation = -1
        # Set once the current connection reached READY: resets the backoff after an outage.
        self._ready_once = False
        # Why the keepalive ended the current connection (its reader only sees a closed stream).
        self._connection_error: BaseException | None = None

    # --- the two ways to run -----------------------------------------------------------------

    async def supervise(self) -> None:
        """reconnect=True: connect, and after every loss connect again with backoff."""
        options = self._options
        attempt = 0
        while not self._closing():
            try:
                await self._connect_once()
            except ConnectionRefused as exc:
                if exc.return_code in _FATAL_REFUSALS:
                    self._fail(exc)
                    return
                self._log.warning("%s; retrying", exc)
            except _CONNECTION_ERRORS as exc:
                if self._closing():
                    return
                reason = self._connection_error or exc
                self._log.info(
                    "connection to %s:%d lost: %s", options.hostname, options.port, describe(reason)
                )
            if self._closing():
                return
            if self._ready_once:
                attempt = 0
            delay = options.backoff.delay(attempt)
            attempt += 1
            self._log.debug("reconnecting in %.2fs (attempt %d)", delay, attempt)
            await anyio.sleep(delay)

    async def run_single_connection(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """reconnect=False: one connection; losing it is fatal for the client.

        Reports ``started`` once the connection is READY; an error before that propagates
        (to ``PersistentClient.__aenter__``).
        """
        try:
            await self._connect_once(task_status=task_status)
        except Exception as exc:
            if not self._ready_once:
                raise
            if not self._closing():
                self._fail(ConnectionLost(f"connection lost: {describe(exc)}"))
        else:
            if not self._closing():
                self._fail(ConnectionLost("connection lost"))

    # --- what the flusher and the client use -------------------------------------------------

    async def send(self, packets: Sequence[Packet], generation: int) -> None:
        """Write packets produced for connection ``generation``, if it is still the current one.

        A failed write drops the connection: the reader sees it end and the supervisor
        reconnects; the session resends whatever was not acknowledged.
        """
        stream = self._stream
        if stream is None or self._generation != generation:
            return
        data = b"".join([encode(packet) for packet in packets])
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._log.debug("send failed: %r", exc)
            await self.drop()

    async def drop(self) -> None:
        """Close the current connection, if any; its reader ends it the usual way."""
        stream = self._stream
        if stream is not None:
            await _close_quietly(stream)

    # --- one connection ----------------------------------------------------------------------

    async def _connect_once(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """One connection's lifetime: connect, CONNACK, read until it dies."""
        session, options = self._session, self._options
        self._ready_once = False
        self._connection_error = None
        stream = await open_stream(
            options.hostname, options.port, tls=options.tls, timeout=options.connect_timeout
        )
        self._stream = stream
        try:
            connected_at = anyio.current_time()
            self._generation = session.connect(connected_at)
            self._wake_flusher()
            error: Exception | None = None
            async with anyio.create_task_group() as tasks:
                # Caught here and re-raised below: inside the task group anyio would wrap it in
                # an ExceptionGroup, and callers want the plain error.
                try:
                    with anyio.CancelScope(
                        deadline=connected_at + options.connect_timeout
                    ) as connack_deadline:
                        await self._read_loop(stream, connack_deadline, tasks, task_status)
                except Exception as exc:
                    error = exc
                if connack_deadline.cancelled_caught:
                    error = TimeoutError(f"no CONNACK within {options.connect_timeout:g}s")
                tasks.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            self._ready.clear()
            self._stream = None
            session.connection_lost()
            await _close_quietly(stream)

    async def _read_loop(
        self,
        stream: ByteStream,
        connack_deadline: anyio.CancelScope,
        tasks: TaskGroup,
        task_status: TaskStatus[None],
    ) -> None:
        """Feed the session until the connection ends (it only ends by raising)."""
        session = self._session
        decoder = Decoder()
        wake_flusher = self._wake_flusher
        awaiting_connack = True
        started = False
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                raise ConnectionLost("the broker closed the connection") from None
            for packet in decoder.feed(data):
                session.receive(packet)
                if session.connection_state is ConnectionState.DISCONNECTED:
                    raise _refusal(packet)
            if awaiting_connack and session.connection_state is not ConnectionState.CONNECTING:
                awaiting_connack = False
                connack_deadline.deadline = math.inf
                if self._options.keepalive:
                    tasks.start_soon(self._keepalive_loop, name="mqtt_persist keepalive")
            if not started and session.connection_state is ConnectionState.READY:
                started = True
                self._ready_once = True
                task_status.started()
            wake_flusher()

    async def _keepalive_loop(self) -> None:
        """Ping when idle; a broker silent for too long ends the connection.

        It never raises: it records why and closes the stream, so the reader ends the
        connection the one way every other failure does.
        """
        session = self._session
        try:
            while True:
                now = anyio.current_time()
                deadline = session.tick(now)
                if session.has_output():
                    self._wake_flusher()
                await anyio.sleep(max(0.05, (deadline or now + 1.0) - now))
        except KeepaliveTimeout as exc:
            self._connection_error = exc
            await self.drop()


def _refusal(packet: Packet) -> Exception:
    """Why the session hung up while reading ``packet``: it refused this CONNACK."""
    match packet:
        case ConnAck(return_code=code):
            return ConnectionRefused(code, _REFUSAL_TEXT.get(code, "unknown reason"))
        case _:  # the session leaves a connection by itself on nothing else
            return ProtocolError(f"the session dropped the connection at {packet!r}")


def describe(exc: BaseException) -> str:
    """An error's message, or its class name when it has none."""
    return str(exc) or type(exc).__name__


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()
