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

The protocol: each connection speaks MQTT 3.1.1 or MQTT 5, as ``options.protocol`` says. With
``"auto"`` the first attempt speaks 5, and a broker that does not speak it is recognised by
its answer to that CONNECT: a CONNACK in the 3.1.1 form with return code 1 (unacceptable
protocol version; nats-server 2.9 does this), an MQTT 5 CONNACK with 0x84 (unsupported protocol
version), or the connection closed before any CONNACK (RabbitMQ 3.10 does this; a TCP
connection that cannot even open, or a CONNACK that does not come in time, says nothing about
the protocol and is retried as usual). The next attempt, at once, speaks 3.1.1, and so does
every later connection of this client: a broker does not learn MQTT 5 while we are connected.
An MQTT 5 connection that ends over a protocol error tells the broker why (DISCONNECT with a
reason code); a broker's DISCONNECT is turned into :class:`ServerDisconnected`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.signals import Signal
from mqtt_persist.errors import (
    ClientIdAssigned,
    ConnectionLost,
    ConnectionRefused,
    KeepaliveTimeout,
    ProtocolError,
    ServerDisconnected,
)
from mqtt_persist.log import ClientLogger
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    ConnectReturnCode,
    Disconnect,
    Packet,
    PacketType,
)
from mqtt_persist.protocol.reason_codes import ReasonCode, describe_reason_code
from mqtt_persist.session.machine import ConnectionState, Session
from mqtt_persist.transport import open_stream

#: Return codes after which retrying the same CONNECT cannot succeed.
_FATAL_REFUSALS = {
    ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ConnectReturnCode.IDENTIFIER_REJECTED,
    ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
    ConnectReturnCode.NOT_AUTHORIZED,
}
#: MQTT 5 CONNACK reason codes after which retrying the same CONNECT cannot succeed (the
#: others: unspecified error, implementation specific, server unavailable or busy, quota or
#: connection rate exceeded, use another server, server moved, are retried with backoff).
_FATAL_REFUSALS_V5 = frozenset(
    {
        0x81, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x95, 0x99, 0x9A, 0x9B,
    }
)  # fmt: skip
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


class _NotMqtt5(Exception):
    """The broker refused an MQTT 5 CONNECT in a way that says it does not speak MQTT 5."""


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
        on_granted_expiry: Callable[[int], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._session = session
        self._options = options
        # The generation ended by renew(): its stream takes no more writes.
        self._ended = 0
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
        self._on_granted_expiry = on_granted_expiry
        #: The protocol of the next connection attempt (``"auto"`` moves it to 3.1.1 for good
        #: once a broker shows that it does not speak MQTT 5).
        self.next_protocol = options.first_protocol
        # The protocol of the current connection, for encoding what the flusher sends.
        self._version = self.next_protocol

    # --- the two ways to run -----------------------------------------------------------------

    async def supervise(self) -> None:
        """reconnect=True: connect, and after every loss connect again with backoff."""
        options = self._options
        attempt = 0
        while not self._closing():
            try:
                await self._connect_once()
            except _NotMqtt5 as exc:
                self._fall_back(exc)
                continue  # at once: the broker is there, it only wants 3.1.1
            except ConnectionRefused as exc:
                if self._fatal_refusal(exc):
                    self._fail(exc)
                    return
                self._log.warning("%s; retrying", exc)
            except ClientIdAssigned as exc:
                self._fail(exc)
                return
            except ServerDisconnected as exc:
                if exc.fatal:
                    self._fail(exc)
                    return
                self._log.warning("%s; reconnecting", exc)
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
            try:
                await self._connect_once(task_status=task_status)
            except _NotMqtt5 as exc:
                self._fall_back(exc)
                await self._connect_once(task_status=task_status)
        except Exception as exc:
            if not self._ready_once:
                raise
            if not self._closing():
                self._fail(ConnectionLost(f"connection lost: {describe(exc)}"))
        else:
            if not self._closing():
                self._fail(ConnectionLost("connection lost"))

    def _fall_back(self, reason: _NotMqtt5) -> None:
        self.next_protocol = MQTT_3_1_1
        self._log.info("the broker does not speak MQTT 5 (%s); using MQTT 3.1.1", reason)

    def _fatal_refusal(self, exc: ConnectionRefused) -> bool:
        if self._version == MQTT_5 and exc.return_code >= 0x80:
            return exc.return_code in _FATAL_REFUSALS_V5
        return exc.return_code in _FATAL_REFUSALS

    @property
    def protocol_version(self) -> int:
        """The protocol of the current connection, or of the last one attempted."""
        return self._version

    # --- what the flusher and the client use -------------------------------------------------

    async def send(self, packets: Sequence[Packet], generation: int) -> None:
        """Write packets produced for connection ``generation``, if it is still the current one.

        A failed write drops the connection: the reader sees it end and the supervisor
        reconnects; the session resends whatever was not acknowledged.
        """
        stream = self._stream
        if stream is None or self._generation != generation or self._ended == generation:
            return
        version = self._version
        data = b"".join([encode(packet, version) for packet in packets])
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._log.debug("send failed: %r", exc)
            await self.drop()

    async def renew(self, generation: int) -> None:
        """End connection ``generation`` cleanly so that the supervisor connects again.

        DISCONNECT first (the broker keeps the session and discards the will), then only our
        half of the stream is closed: the reader reads on until the broker closes, so nothing
        unread on our side turns the close into a reset that could discard what we wrote
        last (acknowledgements). Falls back to :meth:`drop`.
        """
        stream = self._stream
        if stream is None or self._generation != generation:
            return
        # Nothing more is written on it (the session resends what it needs on the next one).
        self._ended = generation
        try:
            await stream.send(encode(Disconnect(), self._version))
            await stream.send_eof()
        except Exception as exc:  # a TLS stream cannot half-close; a dead one cannot send
            self._log.debug("clean renew failed (%r); dropping the connection", exc)
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
        self._version = version = self.next_protocol
        try:
            connected_at = anyio.current_time()
            self._generation = session.connect(connected_at, version)
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
                except ProtocolError as exc:
                    error = exc
                    if version == MQTT_5:
                        # Tell the broker why; best effort, the connection ends either way.
                        await _say_goodbye(stream, exc.reason_code)
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
        session, options = self._session, self._options
        version = self._version
        limit = options.max_packet_size if version == MQTT_5 else None
        decoder = Decoder(protocol_version=version, **({"max_packet_size": limit} if limit else {}))
        wake_flusher = self._wake_flusher
        awaiting_connack = True
        started = False
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                if awaiting_connack and version == MQTT_5 and options.protocol == "auto":
                    raise _NotMqtt5("it closed the connection without answering CONNECT") from None
                raise ConnectionLost("the broker closed the connection") from None
            for packet in decoder.feed(data):
                session.receive(packet)
                if session.connection_state is ConnectionState.DISCONNECTED:
                    raise self._refusal(packet)
            if awaiting_connack and session.connection_state is not ConnectionState.CONNECTING:
                awaiting_connack = False
                connack_deadline.deadline = math.inf
                if session.terms.keepalive:
                    tasks.start_soon(self._keepalive_loop, name="mqtt_persist keepalive")
                granted = session.terms.session_expiry_interval
                if granted is not None and self._on_granted_expiry is not None:
                    tasks.start_soon(self._on_granted_expiry, granted)
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

    def _refusal(self, packet: Packet) -> Exception:
        """Why the session hung up while reading ``packet``: it refused this CONNACK."""
        match packet:
            case ConnAck(return_code=code, properties=props):
                if self._version == MQTT_5 and code >= 0x80:
                    # "Not authorized (0x87)" -> "not authorized": the error adds the code.
                    name = describe_reason_code(code, PacketType.CONNACK).rsplit(" (", 1)[0]
                    text = name[:1].lower() + name[1:]
                else:
                    text = _REFUSAL_TEXT.get(code, "unknown reason")
                unsupported = (
                    ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
                    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                )
                auto = self._options.protocol == "auto"
                if auto and self._version == MQTT_5 and code in unsupported:
                    return _NotMqtt5(f"CONNACK {text}")
                return ConnectionRefused(code, text, reason_string=props.reason_string)
            case _:  # the session leaves a connection by itself on nothing else
                return ProtocolError(f"the session dropped the connection at {packet!r}")


async def _say_goodbye(stream: ByteStream, reason_code: int) -> None:
    """Write an MQTT 5 DISCONNECT with ``reason_code``; never raises, never waits long."""
    with anyio.move_on_after(1.0), contextlib.suppress(Exception):
        await stream.send(encode(Disconnect(reason_code), MQTT_5))


def describe(exc: BaseException) -> str:
    """An error's message, or its class name when it has none."""
    return str(exc) or type(exc).__name__


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()
