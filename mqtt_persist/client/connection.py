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
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from mqtt_persist.backoff import AttemptBudget
from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.signals import Signal
from mqtt_persist.errors import (
    ClientIdAssigned,
    ConnectionLost,
    ConnectionRefused,
    KeepaliveTimeout,
    ProtocolError,
    ServerDisconnected,
    TLSError,
    WebSocketHandshakeFailed,
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
from mqtt_persist.tls import tls_failure
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
    # A stream that needed a second reader or writer (TLS writes from inside a read when the
    # server renegotiates, and reads from inside a write) refused it, and is broken now.
    anyio.BusyResourceError,
)
#: What a failed send raises: the connection is dropped, the client goes on.
_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.BusyResourceError,
    OSError,
)
_READ_SIZE = 65536


class _NotMqtt5(Exception):
    """The broker refused an MQTT 5 CONNECT in a way that says it does not speak MQTT 5.

    ``definite``: it said so (CONNACK "unacceptable protocol version" / 0x84). Otherwise it
    closed the connection without answering, which a broker that only speaks 3.1.1 does
    (RabbitMQ 3.10), and so does one that was going down anyway, or a network cut that landed
    on the CONNECT: only two such closes in a row make the next attempt probe 3.1.1.
    """

    def __init__(self, text: str, *, definite: bool) -> None:
        super().__init__(text)
        self.definite = definite


class ConnectionSupervisor:
    """Keeps the client connected (or, with ``reconnect=False``, connected once).

    ``closing()`` tells it to stop: true while the client closes and once a fatal error (a
    broken store, a fenced session, a refused CONNECT) stopped the client. After a fatal error
    nothing can be committed, so a new connection could never carry anything; the supervisor
    ends instead of reconnecting, and the client reports the error.
    """

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
        # The generation being closed after a protocol error: the flusher writes nothing more
        # on it (renew()'s _ended says more than that: it also paces the reconnect).
        self._silenced = 0
        # A send() is waiting for the stream: nobody else may write on it meanwhile (a second
        # writer on a stream would take the first one's wake-up, or interleave TLS records).
        self._writing = False
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
        # A write failed because the broker had closed its end of the current connection.
        self._peer_hung_up = False
        # The current (or last) connection: when it became READY, whether the broker sent
        # anything after that, whether CONNACK accepted it, and when it ended.
        self._ready_at: float | None = None
        self._heard_after_ready = False
        self._connack_accepted = False
        self._ended_at = 0.0
        # When the current (or last) attempt's connection opened; None: it did not open.
        self._opened_at: float | None = None
        # "auto": "pending" after MQTT 5 CONNECTs closed unanswered, "probing" while the
        # MQTT 3.1.1 attempt that follows runs (see _settle_probe).
        self._probe: str | None = None
        # Connection attempts so far, and the one whose MQTT 5 CONNECT was last closed
        # unanswered (see _fall_back).
        self._attempts = 0
        self._unanswered_at = -1
        self._on_granted_expiry = on_granted_expiry
        #: The protocol of the next connection attempt (``"auto"`` moves it to 3.1.1 for good
        #: once a broker shows that it does not speak MQTT 5).
        self.next_protocol = options.first_protocol
        # The protocol of the current connection, for encoding what the flusher sends.
        self._version = self.next_protocol
        #: Connection attempts (and connections) that ended, and why the last one did, in
        #: words (``"connection refused"``): what a connect timeout reports.
        self.failed_attempts = 0
        self.last_error: str | None = None
        #: True while the supervisor waits between attempts: no connection is up or coming.
        self.backing_off = False

    # --- the two ways to run -----------------------------------------------------------------

    async def supervise(self) -> None:
        """reconnect=True: connect, and after every loss connect again with backoff.

        The delay grows with every attempt and starts from ``backoff.initial`` again only
        after a connection that stayed up ``backoff.reset_after`` seconds and heard from the
        broker after CONNACK (:meth:`_was_stable`); ``backoff.max_per_minute`` caps the
        connections opened per minute (an attempt the broker's host refuses costs it nothing
        and is paced by the delays alone).
        """
        options = self._options
        attempt = 0
        budget = AttemptBudget(options.backoff.max_per_minute)
        while not self._closing():
            wait = budget.wait(anyio.current_time())
            if wait > 0:
                self._log.warning(
                    "%d connections opened to the broker in the last minute "
                    "(Backoff.max_per_minute); waiting %.1fs before the next attempt",
                    options.backoff.max_per_minute,
                    wait,
                )
                # No connection is up or coming meanwhile, as in a backoff delay (the exit
                # does not wait through it).
                self.backing_off = True
                try:
                    await anyio.sleep(wait)
                finally:
                    self.backing_off = False
            try:
                await self._connect_once()
            except _NotMqtt5 as exc:
                self._fall_back(exc)
                continue  # at once: the broker is there, it may only want 3.1.1
            except ConnectionRefused as exc:
                self._attempt_failed(str(exc))
                if self._fatal_refusal(exc):
                    self._fail(exc)
                    return
                self._log.warning("%s; retrying", exc)
            except ClientIdAssigned as exc:
                self._fail(exc)
                return
            except TLSError as exc:
                # A certificate problem is not fixed by retrying: stop, say why (mqtt_persist.tls).
                self._fail(exc)
                return
            except (ServerDisconnected, WebSocketHandshakeFailed) as exc:
                self._attempt_failed(str(exc))
                if exc.fatal:
                    self._fail(exc)
                    return
                self._log.warning("%s; reconnecting", exc)
            except _CONNECTION_ERRORS as exc:
                if self._closing():
                    return
                if self._renewed_here():
                    self._log.debug("renewed connection ended; connecting again at once")
                else:
                    reason = describe_connect_error(self._connection_error or exc)
                    self._attempt_failed(reason)
                    self._log.info("connection to %s lost: %s", options.broker_address, reason)
            finally:
                self._settle_probe()
                # The budget is for connections that got nowhere: one the broker answered after
                # CONNACK was cut, not refused (a flaky network must not cost a minute's wait),
                # and one we ended ourselves (renew()) says nothing about the broker at all.
                if (
                    self._opened_at is not None
                    and not self._heard_after_ready
                    and not self._renewed_here()
                ):
                    budget.started(self._opened_at)
            if self._closing():
                return
            if self._renewed_here():
                attempt = 0
                continue
            if self._was_stable():
                attempt = 0
            delay = options.backoff.delay(attempt)
            attempt += 1
            self._log.debug("reconnecting in %.2fs (attempt %d)", delay, attempt)
            self.backing_off = True
            try:
                await anyio.sleep(delay)
            finally:
                self.backing_off = False

    async def run_single_connection(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """reconnect=False: one connection; losing it is fatal for the client.

        Reports ``started`` once the connection is READY; an error before that propagates
        (to ``PersistentClient.__aenter__``).
        """
        try:
            while True:  # at most three attempts: 5, 5 again, then 3.1.1 (see _fall_back)
                try:
                    await self._connect_once(task_status=task_status)
                except _NotMqtt5 as exc:
                    self._fall_back(exc)
                    continue
                break
        except Exception as exc:
            if not self._ready_once:
                raise
            if not self._closing():
                self._fail(ConnectionLost(f"connection lost: {describe(exc)}"))
        else:
            if not self._closing():
                self._fail(ConnectionLost("connection lost"))

    def _attempt_failed(self, reason: str) -> None:
        self.failed_attempts += 1
        self.last_error = reason

    def _fall_back(self, reason: _NotMqtt5) -> None:
        """After an MQTT 5 CONNECT the broker refused (``definite``) or closed unanswered.

        A refusal says the broker does not speak 5: 3.1.1 from now on. An unanswered close
        is weaker evidence: a network cut or a broker going down that lands on the CONNECT
        looks the same, and a 3.1.1 probe accepted after it would keep the client on 3.1.1
        for its lifetime. So the first such close is answered with MQTT 5 once more, at once;
        only a second one right after it makes the next attempt probe 3.1.1.
        """
        if reason.definite:
            self.next_protocol = MQTT_3_1_1
            self._probe = None
            self._log.info("the broker does not speak MQTT 5 (%s); using MQTT 3.1.1", reason)
            return
        in_a_row = self._unanswered_at == self._attempts - 1
        self._unanswered_at = self._attempts
        if not in_a_row:
            self._log.info("the broker may not speak MQTT 5 (%s); trying MQTT 5 once more", reason)
            return
        self.next_protocol = MQTT_3_1_1
        self._probe = "pending"
        self._log.info("the broker may not speak MQTT 5 (%s, twice); trying MQTT 3.1.1", reason)

    def _settle_probe(self) -> None:
        """After the MQTT 3.1.1 attempt that followed an unanswered MQTT 5 CONNECT.

        Accepted: the broker closed 5 twice and took 3.1.1 right after, so it does not speak
        5; 3.1.1 it is, for the client's lifetime. Not accepted (no CONNACK either, the broker
        unreachable): the close said nothing about the protocol; the next attempt speaks 5.
        """
        if self._probe != "probing":
            return
        self._probe = None
        if self._connack_accepted:
            self._log.info(
                "the broker closed an MQTT 5 CONNECT unanswered and accepted MQTT 3.1.1 at "
                "once: it does not speak MQTT 5; using MQTT 3.1.1"
            )
        else:
            self.next_protocol = MQTT_5
            self._log.debug("MQTT 3.1.1 was not accepted either; the next attempt speaks MQTT 5")

    def _renewed_here(self) -> bool:
        """The last connection was ended by :meth:`renew`, not by the broker or the network."""
        return self._generation > 0 and self._ended == self._generation

    def _was_stable(self) -> bool:
        """The last connection stayed up ``backoff.reset_after`` seconds after READY and the
        broker sent something after CONNACK: a CONNACK alone does not reset the backoff."""
        ready_at = self._ready_at
        return (
            ready_at is not None
            and self._heard_after_ready
            and self._ended_at - ready_at >= self._options.backoff.reset_after
        )

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
        if (
            stream is None
            or self._generation != generation
            or self._ended == generation
            or self._silenced == generation
        ):
            return
        version = self._version
        data = b"".join([encode(packet, version) for packet in packets])
        self._writing = True
        try:
            await stream.send(data)
        except _STREAM_ERRORS as exc:
            self._log.debug("send failed: %r", exc)
            if not isinstance(exc, anyio.ClosedResourceError | anyio.BusyResourceError):
                self._peer_hung_up = True  # the broker closed its end
            await self.drop()
        finally:
            self._writing = False

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
        self._writing = True  # a protocol error meanwhile says no goodbye over this DISCONNECT
        try:
            await stream.send(encode(Disconnect(), self._version))
            await stream.send_eof()
        except Exception as exc:  # a TLS stream cannot half-close; a dead one cannot send
            self._log.debug("clean renew failed (%r); dropping the connection", exc)
            await self.drop()
        finally:
            self._writing = False

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
        self._ready_at = None
        self._heard_after_ready = self._connack_accepted = False
        if self._probe == "pending":
            self._probe = "probing"
        self._opened_at = None
        self._attempts += 1
        stream = await open_stream(
            options.hostname,
            options.port,
            tls=options.tls,
            timeout=options.connect_timeout,
            websocket=options.websocket,
        )
        self._opened_at = anyio.current_time()
        self._stream = stream
        self._version = version = self.next_protocol
        self._peer_hung_up = False
        error: Exception | None = None
        try:
            connected_at = anyio.current_time()
            self._generation = session.connect(connected_at, version)
            self._wake_flusher()
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
                    self._silenced = self._generation
                    if version == MQTT_5 and not self._writing:
                        # Tell the broker why; best effort, the connection ends either way.
                        # Not while the flusher waits to write: one writer at a time.
                        await _say_goodbye(stream, exc.reason_code)
                except Exception as exc:
                    error = exc
                if connack_deadline.cancelled_caught:
                    error = TimeoutError(f"no CONNACK within {options.connect_timeout:g}s")
                tasks.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            self._ended_at = anyio.current_time()
            self._ready.clear()
            self._stream = None
            session.connection_lost(self._closed_by_broker_at(error))
            await _close_quietly(stream)

    def _closed_by_broker_at(self, error: Exception | None) -> float | None:
        """When the broker hung up on this connection (now), or None if it did not.

        A broker hang-up is the stream ending or reset from its side (also noticed by a failed
        write), or an MQTT 5 DISCONNECT; not our keepalive timeout, a protocol error, a CONNACK
        that did not come, or our own close. The session counts prompt hang-ups against the
        message that preceded them (poison messages, session/poison.py).
        """
        if self._closing() or self._connection_error is not None:
            return None
        peer = (ConnectionLost, ConnectionResetError, BrokenPipeError, anyio.BrokenResourceError)
        if self._peer_hung_up or (isinstance(error, peer) and not isinstance(error, TimeoutError)):
            return anyio.current_time()
        return None

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
        # Both versions: MQTT 5 announced the limit in CONNECT; on 3.1.1 the broker cannot
        # know it, but memory must still not be sized by what a broker announces.
        limit = options.max_packet_size
        decoder = Decoder(protocol_version=version, **({"max_packet_size": limit} if limit else {}))
        wake_flusher = self._wake_flusher
        awaiting_connack = True
        started = False
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                if awaiting_connack and version == MQTT_5 and options.protocol == "auto":
                    raise _NotMqtt5(
                        "it closed the connection without answering an MQTT 5 CONNECT",
                        definite=False,
                    ) from None
                raise ConnectionLost("the broker closed the connection") from None
            except ssl.SSLError as exc:
                # TLS 1.3: a broker refuses our certificate after the handshake, with an alert.
                refused = tls_failure(exc, options.broker_address)
                if awaiting_connack and refused is not None:
                    raise refused from exc
                raise
            for packet in decoder.feed(data):
                session.receive(packet)
                if session.connection_state is ConnectionState.DISCONNECTED:
                    raise self._refusal(packet)
            if started:
                self._heard_after_ready = True
            if awaiting_connack and session.connection_state is not ConnectionState.CONNECTING:
                self._connack_accepted = True
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
                self._ready_at = anyio.current_time()
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
                    return _NotMqtt5(f"CONNACK {text}", definite=True)
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


def describe_connect_error(exc: BaseException) -> str:
    """Why a connection attempt failed, in the words a person looks for.

    anyio wraps a refused TCP connect in ``OSError("All connection attempts failed")``; the
    refusal itself is its cause, and "connection refused" is what tells the reader that nothing
    listens there. A connect that ran out of time says so (its TimeoutError has no message).
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        seen = seen.__cause__
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return describe(exc)


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()
