"""The public client: the I/O shell around the sans-IO session.

Three background tasks share one event loop and one :class:`~mqtt_persist.session.Session`:

* the *flusher* drains the session's outbox: it commits the store operations (one ``apply`` per
  burst: group commit), then writes the packets, then resolves publish calls, deliveries and
  received messages. Committing before writing is the write-ahead rule every guarantee rests on.
* the *supervisor* opens connections, reads and decodes packets into the session, runs the
  keepalive timer, and reconnects with exponential backoff and full jitter.
* the caller's own tasks call ``publish``/``subscribe``, which change the session synchronously
  and wait for the flusher's commit.

Because the session never awaits, every change to it is atomic with respect to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import anyio
from anyio.abc import ByteStream, TaskGroup

from mqtt_persist.backoff import Backoff
from mqtt_persist.completion import Delivery, SubscribeRequest, UnsubscribeRequest
from mqtt_persist.errors import (
    ClientClosed,
    ConnectionLost,
    ConnectionRefused,
    InvalidInput,
    KeepaliveTimeout,
    MqttPersistError,
    ProtocolError,
    QueueFull,
    SessionCorrupt,
    SessionExpired,
    StoreError,
)
from mqtt_persist.log import client_logger
from mqtt_persist.message import DeliveryOutcome, Message
from mqtt_persist.protocol.codec import Decoder, encode
from mqtt_persist.protocol.packets import ConnAck, ConnectReturnCode, Will
from mqtt_persist.session.events import (
    Anomaly,
    ConnectionReady,
    ConnectRefused,
    MessageReceived,
    PublishCompleted,
    SubscribeCompleted,
    UnsubscribeCompleted,
)
from mqtt_persist.session.machine import ConnectionState, QueueFullPolicy, Session, SessionConfig
from mqtt_persist.session.state import MessageRemoved, Operation, SessionState
from mqtt_persist.stores.base import SessionStore
from mqtt_persist.stores.memory import MemoryStore
from mqtt_persist.transport import open_stream
from mqtt_persist.validation import (
    coerce_payload,
    max_payload_for,
    validate_client_id,
    validate_qos,
    validate_topic,
    validate_topic_filter,
)

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
_READ_SIZE = 65536
#: How long acknowledged-message removals may wait for another commit to share its fsync.
_DEFER_SECONDS = 0.05
_DEFER_MAX_OPS = 10_000
_CLOSED = object()


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters for monitoring; every message the client gave up on is counted here (G6)."""

    queued: int
    inflight: int
    #: Dropped from a full queue (``queue_full="drop_oldest"``).
    dropped: int
    #: QoS 2 messages past PUBREC when the broker lost its session.
    in_doubt: int
    #: Messages published again as new because the broker lost its session.
    requeued: int
    #: Inbound QoS 2 re-sends acknowledged but not delivered a second time.
    duplicates_suppressed: int
    #: Successful connections (the first one included).
    connections: int


class PersistentClient:
    """An asyncio MQTT 3.1.1 client whose session survives restarts, crashes and outages.

    Use it as an async context manager. Entering opens the store, takes the ownership lease of
    ``client_id``'s stored session, restores it, and starts connecting in the background (with
    ``reconnect=False`` it connects before returning and raises if it cannot). Leaving sends
    DISCONNECT and releases the lease; whatever was not acknowledged yet stays in the store and
    is sent by the next client with the same id and store.

    Args:
        hostname, port: the broker.
        client_id: identifies the session at the broker and in the store; must not be empty
            with ``clean_session=False``.
        store: where the session lives (default: a new :class:`MemoryStore`, which survives
            nothing beyond this process). A store you pass in is opened, not closed.
        clean_session: delete the stored session on entry and ask the broker for a clean one.
        keepalive: seconds; a PINGREQ goes out when the link was quiet that long, and a broker
            silent for as long again ends the connection.
        username, password: sent in CONNECT; never stored.
        tls: an :class:`ssl.SSLContext` for TLS (None: plain TCP).
        reconnect: reconnect with ``backoff`` whenever the connection is lost. With False,
            entering connects once and raises :class:`ConnectionLost` if it cannot.
        max_inflight: QoS 1/2 messages sent and not yet acknowledged, at most. With a durable
            store each refill of this window costs one commit, so it sets durable throughput.
        max_inflight_qos2: QoS 2 flows among them, at most. Keep it below the broker's quota:
            mosquitto allows ``max_inflight_messages`` (20) unacknowledged inbound flows per
            client on MQTT 3.1.1 and silently drops what arrives past it while still
            acknowledging it; QoS 2 flows hold a slot until PUBREL, and a QoS 1 message needs
            one free slot as it arrives, hence 19.
        max_queued: messages waiting for the window, at most (None: no limit).
        queue_full: what ``publish()`` does at ``max_queued``: ``"block"`` until there is room,
            ``"error"`` (raise :class:`QueueFull`) or ``"drop_oldest"`` (counted and logged).
        max_payload_size: refuse larger payloads (default: the protocol limit).
        will: the message the broker publishes if this client vanishes.
        backoff: reconnect delays (default ``Backoff()``: 0.5 s doubling to 30 s, full jitter).
        connect_timeout: seconds for TCP/TLS connect and for CONNACK.
        queue_memory_limit: queued messages held in memory (0: all); the rest are read back
            from the store when due, so memory stays flat however long the queue grows.
        session_expiry: seconds after its last use at which the stored session expires
            (None: never). An expired session is not restored (``session_status == "expired"``).
        cleanup_interval: seconds between removals of expired sessions from the store
            (None: never).
        on_corrupt: unreadable stored data raises :class:`SessionCorrupt` (``"raise"``) or
            starts a new session after logging it loudly (``"start_clean"``); either way the
            damaged data is kept aside by the store, never deleted.
        logger: log through this logger's name instead of ``"mqtt_persist"``.
    """

    def __init__(
        self,
        hostname: str,
        port: int = 1883,
        *,
        client_id: str,
        store: SessionStore | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        username: str | None = None,
        password: str | bytes | None = None,
        tls: ssl.SSLContext | None = None,
        reconnect: bool = True,
        max_inflight: int = 100,
        max_inflight_qos2: int = 19,
        max_queued: int | None = None,
        queue_full: QueueFullPolicy = "block",
        max_payload_size: int | None = None,
        will: Will | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
        queue_memory_limit: int = 1000,
        session_expiry: float | None = None,
        cleanup_interval: float | None = 300.0,
        on_corrupt: Literal["raise", "start_clean"] = "raise",
        logger: logging.Logger | None = None,
    ) -> None:
        validate_client_id(client_id, clean_session=clean_session)
        if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
            raise InvalidInput(f"keepalive must be an int in 0..65535 seconds, not {keepalive!r}")
        if not isinstance(max_inflight, int) or not 1 <= max_inflight <= 65535:
            raise InvalidInput(f"max_inflight must be in 1..65535, not {max_inflight!r}")
        if not isinstance(max_inflight_qos2, int) or not 1 <= max_inflight_qos2 <= max_inflight:
            raise InvalidInput(
                f"max_inflight_qos2 must be in 1..max_inflight, not {max_inflight_qos2!r}"
            )
        if max_queued is not None and (not isinstance(max_queued, int) or max_queued < 1):
            raise InvalidInput(f"max_queued must be a positive int or None, not {max_queued!r}")
        if queue_full not in ("block", "drop_oldest", "error"):
            raise InvalidInput(
                f"queue_full must be 'block', 'drop_oldest' or 'error', not {queue_full!r}"
            )
        if max_payload_size is not None and max_payload_size < 0:
            raise InvalidInput("max_payload_size must not be negative")
        if will is not None:
            validate_topic(will.topic)
            validate_qos(will.qos)
        if not isinstance(queue_memory_limit, int) or queue_memory_limit < 0:
            raise InvalidInput(
                f"queue_memory_limit must be an int >= 0 (0: all in memory), "
                f"not {queue_memory_limit!r}"
            )
        if session_expiry is not None and session_expiry < 0:
            raise InvalidInput(f"session_expiry must be >= 0 seconds, not {session_expiry!r}")
        if cleanup_interval is not None and cleanup_interval <= 0:
            raise InvalidInput(f"cleanup_interval must be > 0 or None, not {cleanup_interval!r}")
        if on_corrupt not in ("raise", "start_clean"):
            raise InvalidInput(f"on_corrupt must be 'raise' or 'start_clean', not {on_corrupt!r}")
        self.session_expiry = session_expiry or None
        self._cleanup_interval = cleanup_interval
        self._on_corrupt = on_corrupt
        #: How the stored session was found on entry: "new", "restored", "expired" or
        #: "corrupt" (only with on_corrupt="start_clean"; the damaged data was kept aside).
        self.session_status: Literal["new", "restored", "expired", "corrupt"] = "new"
        self.hostname = hostname
        self.port = port
        self.client_id = client_id
        self.clean_session = clean_session
        self.reconnect = reconnect
        self.store: SessionStore = store if store is not None else MemoryStore()
        self._owns_store = store is None
        # A store that survives nothing the process does not (MemoryStore) gains nothing from
        # publish() waiting for its commit: the flusher still applies it before sending.
        self._store_durable = bool(getattr(self.store, "durable", True))
        self._tls = tls
        self._backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._max_payload_size = max_payload_size
        self._log = client_logger(client_id, logger.name if logger else "mqtt_persist")
        self._config = SessionConfig(
            client_id=client_id,
            clean_session=clean_session,
            keepalive=keepalive,
            username=username,
            password=password.encode() if isinstance(password, str) else password,
            will=will,
            max_inflight=max_inflight,
            max_inflight_qos2=max_inflight_qos2,
            max_queued=max_queued or 0,
            queue_full=queue_full,
            queue_memory_limit=queue_memory_limit,
        )
        self._session: Session | None = None
        self._task_group: TaskGroup | None = None
        self._stream: ByteStream | None = None
        self._stream_generation = -1
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._room = asyncio.Event()
        self._ready = asyncio.Event()
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._deliveries: dict[int, Delivery] = {}
        self._sub_requests: dict[int, SubscribeRequest | UnsubscribeRequest] = {}
        self._incoming: asyncio.Queue[Message | object] = asyncio.Queue()
        self._fatal: BaseException | None = None
        self._entered = False
        self._closing = False
        self._connections = 0
        # Set once the current connection reached READY: resets the backoff after an outage.
        self._ready_once = False
        self._connection_error: BaseException | None = None
        # One flush at a time, so batches reach the wire in the order they were committed.
        self._flush_lock = asyncio.Lock()
        # MessageRemoved operations waiting to ride along with the next commit (_can_defer).
        self._deferred_ops: list[Operation] = []
        self._deferred_since: float | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ClientClosed("a PersistentClient can be entered only once; create a new one")
        self._entered = True
        store = self.store
        await store.open()
        await store.acquire(self.client_id)
        try:
            state = await self._load_session()
            # The expiry is stored with the session, so any process can clean it up. A new
            # session without one needs no write (update_ttl would create it on disk now).
            if self.session_expiry is not None or state is not None:
                await store.update_ttl(self.client_id, self.session_expiry)
        except BaseException:
            await store.release(self.client_id)
            raise
        self._session = Session(self._config, state)
        if state is not None and not state.is_empty:
            self.session_status = "restored"
            self._log.info(
                "restored session: %d queued, %d in flight, %d subscriptions",
                self._session.queued,
                self._session.inflight,
                len(state.subscriptions),
            )
        self._room.set()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._flush_loop)
        if self._cleanup_interval is not None:
            task_group.start_soon(self._cleanup_loop, self._cleanup_interval)
        if self.reconnect:
            task_group.start_soon(self._supervise)
        else:
            try:
                await task_group.start(self._run_single_connection)
            except BaseException as exc:
                await self._shutdown(graceful=False)
                if isinstance(exc, OSError | TimeoutError):
                    raise ConnectionLost(
                        f"could not connect to {self.hostname}:{self.port}: {exc}"
                    ) from exc
                raise
        return self

    async def _load_session(self) -> SessionState | None:
        store = self.store
        if self.clean_session:
            await store.delete(self.client_id)
            return None
        limit = self._config.queue_memory_limit or None
        try:
            return await store.load(self.client_id, queued_limit=limit)
        except SessionExpired:
            self.session_status = "expired"
            self._log.warning("the stored session had expired; starting a new session")
            return None
        except SessionCorrupt as exc:
            if self._on_corrupt == "raise":
                raise
            self.session_status = "corrupt"
            self._log.error(
                "THE STORED SESSION WAS UNREADABLE AND IS NOT RESTORED (%s); starting a new "
                "session; the damaged data was kept aside for inspection",
                exc,
            )
            await store.delete(self.client_id)
            return None

    async def _cleanup_loop(self, interval: float) -> None:
        """Remove expired sessions from the store now and then; a failure is only logged."""
        while True:
            try:
                removed = await self.store.cleanup_expired()
            except Exception as exc:
                self._log.warning("cleanup of expired sessions failed: %r", exc)
            else:
                if removed:
                    self._log.info("removed %d expired session(s) from the store", removed)
            await anyio.sleep(interval)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown(graceful=True)

    async def _shutdown(self, *, graceful: bool) -> None:
        if self._closing:
            return
        self._closing = True
        session = self._session
        assert session is not None
        try:
            # Commit what the session holds even after a fatal connection error (a refused
            # CONNECT, say); only a broken store makes that pointless.
            if graceful and not isinstance(self._fatal, StoreError):
                with anyio.move_on_after(self._connect_timeout, shield=True):
                    if session.state is not ConnectionState.DISCONNECTED:
                        session.disconnect()
                    await self._flush_now()
        finally:
            if self._stream is not None:
                await _close_quietly(self._stream)
            task_group = self._task_group
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
            session.connection_lost()
            error = self._fatal or ClientClosed(
                "the client closed before this completed; unacknowledged messages stay in the "
                "store and are sent by the next client with the same id and store"
            )
            for waiter in self._commit_waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            for delivery in self._deliveries.values():
                delivery._set_exception(error)
            for request in self._sub_requests.values():
                request._set_exception(error)
            self._incoming.put_nowait(_CLOSED)
            self._room.set()
            # Nothing to save: every operation was committed by the last flush, and a
            # snapshot of the machine would miss queued messages that live in the store only.
            with anyio.CancelScope(shield=True):
                try:
                    await self.store.release(self.client_id)
                finally:
                    if self._owns_store:
                        await self.store.close()
            self._log.info(
                "closed: %d queued and %d in flight left in the store",
                session.queued,
                session.inflight,
            )

    # --- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 0,
        retain: bool = False,
    ) -> Delivery:
        """Put a message in the session and return its :class:`Delivery`.

        For QoS 1/2 it returns once the message is durable in the store, before any byte of it
        is written to the connection (write-ahead). It does not wait for the broker and never
        raises because the broker is unreachable; ``await`` the delivery to wait for the broker's
        acknowledgement. Bad input raises an :class:`~mqtt_persist.errors.InvalidInput` subclass
        before anything is stored. With a full queue it waits (``queue_full="block"``), raises
        :class:`~mqtt_persist.errors.QueueFull` (``"error"``) or drops the oldest queued message
        (``"drop_oldest"``, counted in :attr:`stats` and logged).
        """
        session = self._require_open()
        topic_bytes = validate_topic(topic)
        validate_qos(qos)
        limit = max_payload_for(len(topic_bytes), qos)
        if self._max_payload_size is not None:
            limit = min(limit, self._max_payload_size)
        data = coerce_payload(payload, limit=limit)
        if not isinstance(retain, bool):
            raise InvalidInput(f"retain must be a bool, not {type(retain).__name__}")
        while session.queue_is_full and self._config.queue_full == "block":
            self._room.clear()
            await self._room.wait()
            session = self._require_open()
        if session.queue_is_full and self._config.queue_full == "error":
            raise QueueFull(
                f"outgoing queue is full ({self._config.max_queued} messages waiting); "
                "message refused"
            )
        seq = session.publish(topic, data, qos, retain)
        delivery = Delivery(seq, topic, qos)
        self._deliveries[seq] = delivery
        self._wake.set()
        if qos and self._store_durable:
            await self._committed()
        return delivery

    async def _committed(self) -> None:
        """Wait until the flusher committed everything the session produced so far."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_waiters.append(waiter)
        self._wake.set()
        await waiter

    # --- subscriptions -----------------------------------------------------------------------

    async def subscribe(
        self, topic_filter: str | Sequence[tuple[str, int]], qos: int = 0
    ) -> SubscribeRequest:
        """Record subscriptions in the session and return a :class:`SubscribeRequest`.

        ``topic_filter`` is one filter (subscribed at ``qos``) or a sequence of ``(filter, qos)``
        pairs. It returns once the subscriptions are stored; they are sent now if connected, else
        on the next connect, and restored whenever the broker has lost them (G4). ``await`` the
        returned request for the QoS the broker granted.
        """
        session = self._require_open()
        pairs = _subscription_pairs(topic_filter, qos)
        token = session.subscribe(pairs)
        request = SubscribeRequest(list(dict.fromkeys(f for f, _ in pairs)))
        self._sub_requests[token] = request
        await self._committed()
        return request

    async def unsubscribe(self, topic_filter: str | Sequence[str]) -> UnsubscribeRequest:
        """Remove subscriptions from the session; ``await`` the result for the UNSUBACK."""
        session = self._require_open()
        filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        if not filters:
            raise InvalidInput("unsubscribe needs at least one topic filter")
        for f in filters:
            validate_topic_filter(f)
        token = session.unsubscribe(filters)
        request = UnsubscribeRequest(list(dict.fromkeys(filters)))
        self._sub_requests[token] = request
        await self._committed()
        return request

    # --- receiving ---------------------------------------------------------------------------

    @property
    def messages(self) -> AsyncIterator[Message]:
        """Received messages, in arrival order; ends when the client closes.

        Raises the client's fatal error (for example a refused connection) if one ends it.
        """
        return self._iterate_messages()

    async def _iterate_messages(self) -> AsyncIterator[Message]:
        self._require_open()
        while True:
            item = await self._incoming.get()
            if item is _CLOSED:
                self._incoming.put_nowait(_CLOSED)  # every other iterator ends too
                if self._fatal is not None:
                    raise self._fatal
                return
            assert isinstance(item, Message)
            yield item

    # --- state -------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while the connection is up and the session restored on the broker."""
        return self._ready.is_set() and self._fatal is None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (subscriptions restored); TimeoutError otherwise."""
        self._require_open()
        with anyio.fail_after(timeout):
            # _fail() sets _ready too, to wake this wait: check the fatal error first.
            while True:
                if self._fatal is not None:
                    raise self._fatal
                if self._ready.is_set():
                    return
                await self._ready.wait()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the broker acknowledged every queued and in-flight message."""
        session = self._require_open()
        with anyio.fail_after(timeout):
            # Idle is not enough: the last acknowledgements must also be committed and their
            # deliveries resolved, which happens in the flush after the session went idle.
            while not (
                session.is_idle
                and not session.has_output()
                and not self._flush_lock.locked()
                and not self._deliveries
                and not self._deferred_ops
            ):
                self._flushed.clear()
                await self._flushed.wait()
                self._require_open()

    @property
    def stats(self) -> ClientStats:
        """Current counters."""
        session = self._session
        if session is None:
            return ClientStats(0, 0, 0, 0, 0, 0, self._connections)
        return ClientStats(
            queued=session.queued,
            inflight=session.inflight,
            dropped=session.dropped,
            in_doubt=session.in_doubt,
            requeued=session.requeued,
            duplicates_suppressed=session.duplicates_suppressed,
            connections=self._connections,
        )

    def _require_open(self) -> Session:
        if self._fatal is not None:
            raise self._fatal
        if self._session is None or self._closing:
            raise ClientClosed("use the client inside 'async with PersistentClient(...)'")
        return self._session

    def _fail(self, error: BaseException) -> None:
        """A fatal error: the client stops and every waiter learns why."""
        if self._fatal is None:
            self._fatal = error
            self._log.error("client stopped: %s", error)
        self._incoming.put_nowait(_CLOSED)
        self._room.set()
        self._ready.set()  # wake wait_connected, which re-checks _fatal
        self._flushed.set()

    # --- the flusher -------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            try:
                await self._flush_once()
            except StoreError as exc:
                for waiter in self._commit_waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                self._commit_waiters.clear()
                self._fail(exc)
                await self._drop_connection()
                return
            except Exception as exc:  # a bug; never leave callers hanging silently
                self._log.exception("flusher failed")
                self._fail(MqttPersistError(f"internal error in the flusher: {exc!r}"))
                await self._drop_connection()
                return

    async def _flush_now(self) -> None:
        """Flush until nothing is left (used on close, outside the flusher task)."""
        session = self._session
        assert session is not None
        while session.has_output() or self._commit_waiters or self._deferred_ops:
            await self._flush_once(force=True)

    async def _flush_once(self, *, force: bool = False) -> None:
        async with self._flush_lock:
            await self._flush_locked(force)

    async def _flush_locked(self, force: bool = False) -> None:
        session = self._session
        assert session is not None
        loop = asyncio.get_running_loop()
        outbox = session.take(loop.time())
        waiters = self._commit_waiters
        self._commit_waiters = []
        ops = outbox.ops
        if self._deferred_ops:
            ops = self._deferred_ops + ops
            self._deferred_ops = []
        if ops and not force and not waiters and self._can_defer(ops, loop.time()):
            self._deferred_ops = ops
        elif ops:
            self._deferred_since = None
            try:
                await self.store.apply(self.client_id, ops)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, StoreError)
                    else StoreError(f"store failed to write the session journal: {exc!r}")
                )
                # These publish() calls were waiting for exactly this commit: they must learn
                # that their messages were not accepted, not wait forever.
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                if error is exc:
                    raise
                raise error from exc
            except BaseException:
                # Cancelled (the client is closing): hand the waiters to _shutdown to fail.
                self._commit_waiters[:0] = waiters
                raise
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if outbox.packets:
            stream = self._stream
            if stream is not None and self._stream_generation == outbox.generation:
                data = b"".join([encode(packet) for packet in outbox.packets])
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    # The reader sees the same failure and reconnects; the session resends.
                    self._log.debug("send failed: %r", exc)
                    await self._drop_connection()
        for event in outbox.events:
            self._handle_event(event)
        # Everything taken so far is committed, which read_queued needs to see it.
        request = session.want_refill()
        if request is not None:
            try:
                messages = await self.store.read_queued(self.client_id, *request)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"store failed to read queued messages: {exc!r}") from exc
            session.refill(messages)
        if session.has_output():
            self._wake.set()
        elif not session.queue_is_full:
            self._room.set()
        self._flushed.set()

    def _can_defer(self, ops: list[Operation], now: float) -> bool:
        """Whether a batch may wait for the next commit instead of costing an fsync of its own.

        Only a batch of nothing but MessageRemoved qualifies: no packet depends on it, and
        losing it in a crash means a message the broker already acknowledged is sent once more
        after the restart (QoS 1: at least once allows it; QoS 2: it resumes with PUBREL, which
        the broker answers without delivering again). It waits at most _DEFER_SECONDS, so a
        sequential publisher pays one fsync per message instead of two.
        """
        if not self._store_durable or len(ops) > _DEFER_MAX_OPS:
            return False
        if any(type(op) is not MessageRemoved for op in ops):
            return False
        if self._deferred_since is None:
            self._deferred_since = now
            # Make sure the commit happens even if nothing else comes along.
            asyncio.get_running_loop().call_later(_DEFER_SECONDS, self._wake.set)
            return True
        return now - self._deferred_since < _DEFER_SECONDS

    def _handle_event(self, event: object) -> None:
        kind = type(event)
        if kind is PublishCompleted:
            assert isinstance(event, PublishCompleted)
            delivery = self._deliveries.pop(event.seq, None)
            outcome = event.outcome
            if outcome is DeliveryOutcome.DROPPED:
                self._log.warning(
                    "queue full: dropped the oldest queued message (seq %d, topic %r)",
                    event.seq,
                    delivery.topic if delivery else "?",
                )
            elif outcome is DeliveryOutcome.IN_DOUBT:
                self._log.warning(
                    "QoS 2 message seq %d is in doubt: the broker lost its session after PUBREC",
                    event.seq,
                )
            if delivery is not None:
                delivery._set_result(outcome)
        elif kind is MessageReceived:
            assert isinstance(event, MessageReceived)
            self._incoming.put_nowait(event.message)
        elif kind is SubscribeCompleted:
            assert isinstance(event, SubscribeCompleted)
            request = self._sub_requests.pop(event.token, None)
            if isinstance(request, SubscribeRequest):
                request._complete(event.return_codes)
            refused = [c for c in event.return_codes if c == 0x80]
            if refused:
                self._log.warning("broker refused %d subscription filter(s)", len(refused))
        elif kind is UnsubscribeCompleted:
            assert isinstance(event, UnsubscribeCompleted)
            request = self._sub_requests.pop(event.token, None)
            if request is not None:
                request._set_result(None)  # type: ignore[arg-type]
        elif kind is ConnectionReady:
            assert isinstance(event, ConnectionReady)
            self._connections += 1
            if not event.session_present and (event.requeued or event.in_doubt):
                self._log.warning(
                    "broker had lost the session: %d message(s) published again, "
                    "%d QoS 2 message(s) in doubt",
                    event.requeued,
                    event.in_doubt,
                )
            self._log.info(
                "connected to %s:%d (session present: %s)",
                self.hostname,
                self.port,
                event.session_present,
            )
            self._ready.set()
        elif kind is ConnectRefused:
            pass  # the reader raised ConnectionRefused already
        elif kind is Anomaly:
            assert isinstance(event, Anomaly)
            self._log.warning("broker anomaly: %s", event.text)

    # --- connections -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect_once()
            except ConnectionRefused as exc:
                if exc.return_code in _FATAL_REFUSALS:
                    self._fail(exc)
                    return
                self._log.warning("%s; retrying", exc)
            except (
                OSError,
                TimeoutError,
                ConnectionLost,
                ProtocolError,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ) as exc:
                if self._closing:
                    return
                reason = self._connection_error or exc
                self._log.info(
                    "connection to %s:%d lost: %s", self.hostname, self.port, _describe(reason)
                )
            if self._closing:
                return
            if self._ready_once:
                attempt = 0
            delay = self._backoff.delay(attempt)
            attempt += 1
            self._log.debug("reconnecting in %.2fs (attempt %d)", delay, attempt)
            await anyio.sleep(delay)

    async def _run_single_connection(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """reconnect=False: one connection; losing it is fatal for the client."""
        try:
            await self._connect_once(task_status=task_status)
        except Exception as exc:
            if not self._ready_once:
                raise  # __aenter__ reports it
            if not self._closing:
                self._fail(ConnectionLost(f"connection lost: {_describe(exc)}"))
        else:
            if not self._closing:
                self._fail(ConnectionLost("connection lost"))

    async def _connect_once(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """One connection's lifetime: connect, CONNACK, read until it dies."""
        session = self._session
        assert session is not None
        self._ready_once = False
        self._connection_error = None
        stream = await open_stream(
            self.hostname, self.port, tls=self._tls, timeout=self._connect_timeout
        )
        self._stream = stream
        try:
            loop = asyncio.get_running_loop()
            self._stream_generation = session.connect(loop.time())
            self._wake.set()
            error: Exception | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keepalive_loop, loop.time())
                # Caught here and re-raised below: inside the task group anyio would wrap it in
                # an ExceptionGroup, and callers want the plain error.
                try:
                    await self._read_loop(stream, task_status)
                except Exception as exc:
                    error = exc
                tg.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            self._ready.clear()
            self._stream = None
            session.connection_lost()
            await _close_quietly(stream)

    async def _read_loop(self, stream: ByteStream, task_status: anyio.abc.TaskStatus[None]) -> None:
        session = self._session
        assert session is not None
        decoder = Decoder()
        started = False
        wake = self._wake
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                raise ConnectionLost("the broker closed the connection") from None
            for packet in decoder.feed(data):
                if type(packet) is ConnAck and packet.return_code:
                    code = packet.return_code
                    raise ConnectionRefused(code, _REFUSAL_TEXT.get(code, "unknown reason"))
                session.receive(packet)
            if not started and session.state is ConnectionState.READY:
                started = True
                self._ready_once = True
                task_status.started()
            wake.set()

    async def _keepalive_loop(self, connected_at: float) -> None:
        """Ping when idle; a silent broker or a missing CONNACK ends the connection.

        It never raises: it records why and closes the stream, so the reader ends the
        connection the one way every other failure does.
        """
        session = self._session
        assert session is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = loop.time()
                if session.state is ConnectionState.CONNECTING:
                    if now - connected_at > self._connect_timeout:
                        raise TimeoutError(f"no CONNACK within {self._connect_timeout:g}s")
                    await anyio.sleep(min(0.2, self._connect_timeout))
                    continue
                deadline = session.tick(now)
                if session.has_output():
                    self._wake.set()
                await anyio.sleep(max(0.05, (deadline or now + 1.0) - now))
        except (KeepaliveTimeout, TimeoutError) as exc:
            self._connection_error = exc
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        stream = self._stream
        if stream is not None:
            await _close_quietly(stream)


def _subscription_pairs(
    topic_filter: str | Sequence[tuple[str, int]], qos: int
) -> list[tuple[str, int]]:
    if isinstance(topic_filter, str):
        return [(validate_topic_filter(topic_filter), validate_qos(qos))]
    pairs = [(validate_topic_filter(f), validate_qos(q)) for f, q in topic_filter]
    if not pairs:
        raise InvalidInput("subscribe needs at least one topic filter")
    return pairs


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await stream.aclose()
