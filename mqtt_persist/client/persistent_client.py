"""The public client: :class:`PersistentClient`, the I/O shell around the sans-IO session.

This module is the public API and the wiring; each job lives in a module of its own, and the
running parts are named tasks in one task group, entered and left with the client:

* ``storage.py``: the store's side of the client's life (open, lease, load, expiry, cleanup);
* ``flusher.py``: the *flusher* task commits the session's output (one ``store.apply`` per
  burst: group commit), then writes the packets, then resolves the callers; committing before
  writing is the write-ahead rule every guarantee rests on;
* ``connection.py``: the *connection* task connects, reads packets into the session, runs the
  keepalive, and reconnects with exponential backoff and full jitter;
* ``dispatch.py``: what the session reports, handed to the application after its commit.

The caller's own tasks call ``publish``/``subscribe``, which change the session synchronously
and wait for the flusher's commit. Because the session never awaits, every change to it is
atomic with respect to the others.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import anyio
from anyio.abc import TaskGroup

from mqtt_persist.backoff import Backoff
from mqtt_persist.client.connection import ConnectionSupervisor, describe_connect_error
from mqtt_persist.client.dispatch import EventDispatcher
from mqtt_persist.client.exit import settle_before_exit, settled
from mqtt_persist.client.flusher import Flusher
from mqtt_persist.client.options import AckMode, ClientOptions, ProtocolChoice, TransportChoice
from mqtt_persist.client.publishing import check_batch_room, prepare, prepare_batch
from mqtt_persist.client.signals import Signal
from mqtt_persist.client.storage import SessionStatus, SessionStorage
from mqtt_persist.compat import Compat
from mqtt_persist.completion import Completion, Delivery, SubscribeRequest, UnsubscribeRequest
from mqtt_persist.errors import (
    ClientClosed,
    ConnectionLost,
    ConnectTimeout,
    InvalidInput,
    QueueFull,
    StoreError,
)
from mqtt_persist.log import LOGGER_NAME, client_logger
from mqtt_persist.message import Message
from mqtt_persist.metrics import MetricsSink
from mqtt_persist.protocol.packets import (
    MQTT_3_1_1,
    NO_PROPERTIES,
    Properties,
    ProtocolVersion,
    RetainHandling,
    SubscriptionOptions,
    Will,
)
from mqtt_persist.session.machine import ConnectionState, QueueFullPolicy, Session
from mqtt_persist.session.state import SetAsideMessage, StoredSubscription
from mqtt_persist.stores.base import SessionStore
from mqtt_persist.stores.memory import MemoryStore
from mqtt_persist.tls import resolve_tls
from mqtt_persist.validation import (
    is_shared_subscription,
    validate_qos,
    validate_topic,
    validate_topic_filter,
)


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters for monitoring: every message the client gave up on is counted here.

    (What "nothing is lost silently" promises.)
    """

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
    #: Messages whose MQTT 5 Message Expiry Interval passed before the broker took them.
    expired: int = 0
    #: Messages the broker refused (MQTT 5 PUBACK/PUBREC reason codes) or announced it cannot
    #: take (Maximum Packet Size, Maximum QoS, Retain Available).
    refused: int = 0
    #: QoS 2 messages the broker acknowledged with PUBACK, i.e. took at QoS 1 (RabbitMQ
    #: downgrades QoS 2 this way); their deliveries resolve as ``DOWNGRADED``.
    downgraded: int = 0
    #: Messages set aside as poison by this client (``poison_after``); see ``set_aside()``.
    set_aside: int = 0
    #: Received messages waiting in ``client.messages`` now, and the most that ever waited
    #: (never more than ``max_unread_messages``).
    unread: int = 0
    unread_peak: int = 0
    #: QoS 1/2 messages received beyond ``max_unread_messages``: held, not yet acknowledged.
    held_back: int = 0
    #: QoS 0 messages dropped (oldest first) because ``max_unread_messages`` were waiting.
    unread_dropped: int = 0
    #: Inbound QoS 1/2 messages whose acknowledgement has not gone to the broker yet
    #: (``ack="manual"`` or held back).
    unacknowledged: int = 0
    #: QoS 1/2 messages the broker sent past its flow control beyond ``max_unread_messages``
    #: held ones: let go unacknowledged, and sent again by the broker after a reconnect.
    shed: int = 0


class PersistentClient:
    """An asyncio MQTT 5 and 3.1.1 client whose session survives restarts, crashes and outages.

    Use it as an async context manager. Entering opens the store, takes the ownership lease of
    ``client_id``'s stored session, restores it, and starts connecting in the background (with
    ``reconnect=False`` it connects before returning and raises if it cannot). Leaving waits
    up to ``exit_timeout`` for the broker to answer pending subscribe/unsubscribe requests and
    acknowledge messages, then sends DISCONNECT and releases the lease; whatever was not
    acknowledged yet stays in the store and is sent by the next client with the same id and
    store.

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
        tls: ``True`` for TLS verified the standard way (:func:`ssl.create_default_context`:
            the system's CAs, and the certificate must name ``hostname``), an
            :class:`ssl.SSLContext` of your own (a private CA or a client certificate:
            :func:`~mqtt_persist.tls_context`), or None/False for plain TCP. A certificate
            that does not verify stops the client with :class:`TLSError` (no retries).
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
        backoff: reconnect delays (default ``Backoff()``: 0.5 s doubling to 30 s, full jitter;
            back to 0.5 s only after a connection that stayed up 10 s and heard from the
            broker, not after a bare CONNACK; at most 30 connections opened a minute).
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
        protocol: ``ProtocolVersion.V5``, ``ProtocolVersion.V311``, or ``"auto"`` (the
            default): MQTT 5, and MQTT 3.1.1 from the moment a broker shows it does not speak 5
            (it answers the MQTT 5 CONNECT with "unacceptable protocol version", or closes the
            connection without answering and then accepts a 3.1.1 CONNECT at once).
            :attr:`protocol_version` tells which one is in use.
            On MQTT 5 ``clean_session`` and ``session_expiry`` become Clean Start and the
            Session Expiry Interval, the broker's Receive Maximum bounds the in-flight window
            (in place of ``max_inflight_qos2``), and publish properties, subscription options,
            message expiry and reason codes work; see the README's MQTT 5 section.
        receive_maximum: MQTT 5: how many QoS 1/2 messages the broker may leave
            unacknowledged with this client (None: no limit announced, i.e. 65,535). A broker
            that sends more ends the connection with DISCONNECT 0x93.
        max_packet_size: the largest packet (header included) this client accepts (None: the
            protocol's 256 MB). A packet announcing more ends the connection as soon as its
            fixed header is read, before any of its body is buffered, so no broker can make the
            client hold more than this for one packet. MQTT 5 announces it in CONNECT, so the
            broker never sends a larger packet (it drops the message instead); MQTT 3.1.1 has
            no way to tell the broker, so a larger message from it ends every connection it is
            resent on: pick a limit above the largest message you subscribe to.
        topic_alias_maximum: MQTT 5: how many topic aliases the broker may set up on a
            connection to this client (0: none); aliases are resolved before ``messages``.
        ack: ``"auto"`` (the default): the client acknowledges a QoS 1/2 message to the broker
            when it is handed to ``messages``. ``"manual"``: only when the application
            acknowledges it (:meth:`ack`, ``message.ack()``, ``message.processing()``), so a
            crash before that makes the broker deliver it again; see :meth:`ack`.
        max_unread_messages: received messages waiting in ``messages``, at most (None: no
            bound). QoS 1/2 messages beyond it are held unacknowledged, so the broker's flow
            control stops sending; QoS 0 messages beyond it are dropped oldest first and
            counted (``stats.unread_dropped``). Held messages rely on the broker's flow
            control (MQTT 5: our Receive Maximum, which defaults to this bound when
            ``receive_maximum`` is None; MQTT 3.1.1: its in-flight limit). A broker that sends
            past it anyway (mosquitto 2.0.11 does) has the excess beyond this many held
            messages let go unacknowledged (``stats.shed``); the client reconnects once the
            held ones are read, and the broker sends them again. So received messages in
            memory: at most twice this bound. With ``reconnect=False`` nothing is let go.
        logger: log through this logger's name instead of ``"mqtt_persist"``.
        poison_after: when the broker closed the connection right after the same message was
            sent this many times in a row, the message is *set aside*: kept in the store, not
            sent again, its delivery resolved ``SET_ASIDE`` (nats-server closes the connection
            on a PUBLISH it will not take). See :meth:`set_aside`. 0: never.
        exit_timeout: seconds that leaving ``async with`` waits, at most, for what is still
            pending with the broker: SUBSCRIBE/UNSUBSCRIBE requests not yet answered and
            queued or in-flight messages not yet acknowledged. It waits only while a
            connection is up or being attempted (not through a backoff delay), and not when
            the block is left by cancellation. 0 skips the wait; whatever is left stays in the
            store either way and is sent by the next client with the same id and store.
        metrics: a :class:`~mqtt_persist.metrics.MetricsSink` to report to, e.g.
            :class:`~mqtt_persist.metrics.prometheus.PrometheusMetrics` (None: no metrics, and
            no cost). The names are listed in docs/metrics.md.
        transport: ``"tcp"`` (the default; TLS with ``tls``) or ``"websockets"``: MQTT over
            WebSockets, ``ws://hostname:port/websocket_path``, or ``wss://`` with ``tls``
            (needs the extra ``mqtt-persist[websockets]``). The server must accept the
            subprotocol ``mqtt``; a refused upgrade raises
            :class:`~mqtt_persist.errors.WebSocketHandshakeFailed` (from
            ``wait_connected()`` and ``messages``), see its ``fatal``.
        websocket_path: the HTTP path of the upgrade request (default ``"/mqtt"``).
        websocket_headers: extra HTTP headers for the upgrade request, e.g. a token for an
            authenticating proxy (a mapping or name/value pairs).
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
        tls: ssl.SSLContext | bool | None = None,
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
        protocol: ProtocolChoice = "auto",
        receive_maximum: int | None = None,
        max_packet_size: int | None = None,
        topic_alias_maximum: int = 16,
        logger: logging.Logger | None = None,
        poison_after: int = 3,
        compat: Compat | None = None,
        exit_timeout: float = 5.0,
        metrics: MetricsSink | None = None,
        transport: TransportChoice = "tcp",
        websocket_path: str = "/mqtt",
        websocket_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        ack: AckMode = "auto",
        max_unread_messages: int | None = None,
    ) -> None:
        options = ClientOptions(
            hostname=hostname,
            port=port,
            client_id=client_id,
            clean_session=clean_session,
            keepalive=keepalive,
            username=username,
            password=password,
            tls=resolve_tls(tls),
            reconnect=reconnect,
            max_inflight=max_inflight,
            max_inflight_qos2=max_inflight_qos2,
            max_queued=max_queued,
            queue_full=queue_full,
            max_payload_size=max_payload_size,
            will=will,
            backoff=backoff or Backoff(),
            connect_timeout=connect_timeout,
            queue_memory_limit=queue_memory_limit,
            session_expiry=session_expiry,
            cleanup_interval=cleanup_interval,
            on_corrupt=on_corrupt,
            protocol=protocol,
            receive_maximum=receive_maximum,
            max_packet_size=max_packet_size,
            topic_alias_maximum=topic_alias_maximum,
            logger_name=logger.name if logger else LOGGER_NAME,
            poison_after=poison_after,
            compat=compat,
            exit_timeout=exit_timeout,
            transport=transport,
            websocket_path=websocket_path,
            websocket_headers=websocket_headers,
            ack=ack,
            max_unread_messages=max_unread_messages,
        )
        self._options = options
        self.hostname = hostname
        self.port = port
        self.client_id = client_id
        self.clean_session = clean_session
        self.reconnect = reconnect
        self.session_expiry = options.expires_after
        #: How the stored session was found on entry: "new", "restored", "expired" or
        #: "corrupt" (only with on_corrupt="start_clean"; the damaged data was kept aside).
        self.session_status: SessionStatus = "new"
        self.store: SessionStore = store if store is not None else MemoryStore()
        self._log = client_logger(client_id, options.logger_name)
        # None without a sink: each hook is then one `is not None` test.
        self._metrics = metrics.bind(client_id, self) if metrics is not None else None
        self._storage = SessionStorage(
            self.store, owns_store=store is None, options=options, log=self._log
        )
        # Built on entry, around the session loaded from the store.
        self._session: Session | None = None
        self._parts: _Running | None = None
        self._task_group: TaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._fatal: BaseException | None = None
        self._entered = False
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ClientClosed("a PersistentClient can be entered only once; create a new one")
        self._entered = True
        options = self._options
        try:
            state = await self._storage.open()
        finally:
            self.session_status = self._storage.status
        async with AsyncExitStack() as stack:
            # Unwound in reverse on close: the task group ends first, then every caller still
            # waiting learns why, then the lease is released.
            stack.push_async_callback(self._release_store)
            session = Session(options.session_config(), state)
            self._session = session
            if self.session_status == "restored" and state is not None:
                self._log.info(
                    "restored session: %d queued, %d in flight, %d subscriptions",
                    session.queued,
                    session.inflight,
                    len(state.subscriptions),
                )
            parts = self._parts = self._build(session)
            stack.callback(self._abandon_pending, parts)
            tasks = await stack.enter_async_context(anyio.create_task_group())
            self._task_group = tasks
            name = f"[{options.client_id}]"
            tasks.start_soon(parts.flusher.run, name=f"mqtt_persist flusher {name}")
            tasks.start_soon(
                parts.flusher.deferral_timer, name=f"mqtt_persist deferral timer {name}"
            )
            if options.cleanup_interval is not None:
                tasks.start_soon(
                    self._storage.cleanup_loop,
                    options.cleanup_interval,
                    name=f"mqtt_persist store cleanup {name}",
                )
            if options.reconnect:
                tasks.start_soon(parts.connection.supervise, name=f"mqtt_persist connection {name}")
            self._exit_stack = stack.pop_all()
        if not options.reconnect:
            try:
                await tasks.start(
                    parts.connection.run_single_connection, name=f"mqtt_persist connection {name}"
                )
            except BaseException as exc:
                await self._shutdown(graceful=False)
                if isinstance(exc, OSError | TimeoutError):
                    raise ConnectionLost(
                        f"could not connect to {options.broker_address}: "
                        f"{describe_connect_error(exc)}"
                    ) from exc
                raise
        return self

    def _build(self, session: Session) -> _Running:
        """The parts that run inside the task group, wired to each other and to this client."""
        options = self._options
        wake = Signal()
        dispatcher = EventDispatcher(
            self._log,
            (options.hostname, options.port),
            max_unread=options.max_unread_messages or 0,
            on_leave=lambda message: self._message_left(session, wake),
            acker=self if options.ack == "manual" else None,
            ack_now=lambda message: self._ack_now(session, wake, message),
            metrics=self._metrics,
        )
        connection = ConnectionSupervisor(
            session,
            options,
            log=self._log,
            ready=dispatcher.ready,
            wake_flusher=wake.set,
            fail=self._fail,
            # A fatal error (a broken store, a fenced session) ends the client, and with it
            # the reconnecting: a connection nothing can commit for would only time out.
            closing=lambda: self._closing or self._fatal is not None,
            on_granted_expiry=self._follow_granted_expiry,
        )
        flusher = Flusher(
            session,
            self.store,
            client_id=options.client_id,
            durable=self._storage.durable,
            connection=connection,
            dispatcher=dispatcher,
            log=self._log,
            fail=self._fail,
            wake=wake,
            metrics=self._metrics,
        )
        return _Running(session, dispatcher, connection, flusher)

    async def _follow_granted_expiry(self, granted: int) -> None:
        """MQTT 5: the broker's Session Expiry Interval wins; the stored session follows it.

        0 (the broker keeps no session) is not followed: the store's session still holds the
        messages this client accepted, and those must survive a restart all the same.
        """
        if granted == 0 or self._options.clean_session:
            return
        seconds = None if granted == 0xFFFFFFFF else float(granted)
        if seconds == self.session_expiry:
            return
        self.session_expiry = seconds
        try:
            await self.store.update_ttl(self.client_id, seconds)
        except Exception as exc:  # the session itself is unharmed; only its expiry lags
            self._log.warning("could not store the broker's session expiry: %r", exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        parts = self._parts
        if parts is not None and not self._closing and (exc is None or isinstance(exc, Exception)):
            await settle_before_exit(
                parts.session,
                parts.flusher,
                parts.dispatcher,
                parts.connection,
                timeout=self._options.exit_timeout,
                failed=lambda: self._fatal is not None,
                log=self._log,
            )
        await self._shutdown(graceful=True)

    async def _shutdown(self, *, graceful: bool) -> None:
        parts, stack, tasks = self._parts, self._exit_stack, self._task_group
        if parts is None or stack is None or tasks is None or self._closing:
            return
        self._closing = True
        session = parts.session
        try:
            # Commit what the session holds even after a fatal connection error (a refused
            # CONNECT, say); only a broken store makes that pointless.
            if graceful and not isinstance(self._fatal, StoreError):
                with anyio.move_on_after(self._options.connect_timeout, shield=True):
                    if session.connection_state is not ConnectionState.DISCONNECTED:
                        session.disconnect()
                    await parts.flusher.finish()
        finally:
            await parts.connection.drop()
            tasks.cancel_scope.cancel()
            await stack.aclose()

    def _abandon_pending(self, parts: _Running) -> None:
        """The tasks ended: every caller still waiting learns why."""
        parts.session.connection_lost()
        error = self._fatal or ClientClosed(
            "the client closed before this completed; unacknowledged messages stay in the "
            "store and are sent by the next client with the same id and store"
        )
        parts.flusher.fail_waiting(error)
        parts.dispatcher.fail_pending(error)
        parts.flusher.room.set()

    async def _release_store(self) -> None:
        await self._storage.close()
        session = self._session
        if session is not None:
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
        *,
        properties: Properties | None = None,
    ) -> Delivery:
        """Put a message in the session and return its :class:`Delivery`.

        For QoS 1/2 it returns once the message is durable in the store, before any byte of it
        is written to the connection (write-ahead). It does not wait for the broker and never
        raises because the broker is unreachable; ``await`` the delivery to wait for the broker's
        acknowledgement. Bad input raises an :class:`~mqtt_persist.errors.InvalidInput` subclass
        before anything is stored. With a full queue it waits (``queue_full="block"``), raises
        :class:`~mqtt_persist.errors.QueueFull` (``"error"``) or drops the oldest queued message
        (``"drop_oldest"``, counted in :attr:`stats` and logged).

        ``properties`` (MQTT 5) are the message's PUBLISH properties: user properties, content
        type, payload format indicator, response topic, correlation data and message expiry
        interval, e.g. ``Properties(user_properties=(("k", "v"),), message_expiry_interval=60)``.
        They are stored with the message. The expiry runs from this call: every (re)send
        carries what is left of it, and a message that expires before it reached the broker
        is discarded, counted in :attr:`stats` and logged, and its delivery resolves
        ``EXPIRED``. With ``protocol=ProtocolVersion.V311`` properties are refused; with
        ``"auto"`` against a 3.1.1-only broker they are not sent (logged once a connection),
        while the expiry is still kept here. A message the connected MQTT 5 broker announced
        it cannot take (over its Maximum Packet Size) raises
        :class:`~mqtt_persist.errors.PayloadTooLarge`; one found out later resolves
        ``REFUSED``. A PUBACK/PUBREC with a failure reason code resolves ``REFUSED`` too, with
        ``delivery.reason_code``.
        """
        parts = self._require_open()
        session, flusher = parts.session, parts.flusher
        options = self._options
        topic, data, props, expires_at = prepare(
            options, session, topic, payload, qos, retain, properties
        )
        if options.max_queued is not None:  # else the queue is never full
            while session.queue_is_full and options.queue_full == "block":
                flusher.room.clear()
                await flusher.room.wait()
                session = self._require_open().session
            if session.queue_is_full and options.queue_full == "error":
                raise QueueFull(
                    f"outgoing queue is full ({options.max_queued} messages waiting); "
                    "message refused"
                )
        seq = session.publish(topic, data, qos, retain, props, expires_at)
        return await self._track(parts, seq, topic, qos)

    async def _track(self, parts: _Running, seq: int, topic: str, qos: int) -> Delivery:
        """The delivery of the message ``seq`` just accepted, once it is stored."""
        if self._metrics is not None:
            self._metrics.published(qos)
        delivery = Delivery(seq, topic, qos)
        parts.dispatcher.deliveries[seq] = delivery
        parts.flusher.wake.set()
        if qos and self._storage.durable:
            await parts.flusher.committed()
        return delivery

    async def publish_many(
        self,
        messages: Iterable[tuple[str, bytes | bytearray | memoryview | str]],
        qos: int = 0,
        retain: bool = False,
        *,
        properties: Properties | None = None,
    ) -> list[Delivery]:
        """Publish a batch of ``(topic, payload)`` messages; one :class:`Delivery` each, in order.

        The promise is :meth:`publish`'s, for the whole batch: at QoS 1/2 it returns once every
        message is durable in the store, with one commit for the batch (a gateway forwarding
        a buffer of readings pays one fsync, not one per reading). ``qos``, ``retain`` and
        ``properties`` apply to every message. Every message is checked before any is stored:
        the first bad one raises its :class:`~mqtt_persist.errors.InvalidInput` subclass (a
        note names its index) and nothing of the batch is stored. The batch enters the queue
        whole: with ``max_queued`` it waits until it fits (``queue_full="block"``), raises
        :class:`~mqtt_persist.errors.QueueFull` (``"error"``, or a batch larger than
        ``max_queued``), or drops the oldest queued messages (``"drop_oldest"``). Messages
        leave in the batch's order, after everything published before.
        """
        parts = self._require_open()
        session, flusher = parts.session, parts.flusher
        options = self._options
        batch = prepare_batch(options, session, messages, qos, retain, properties)
        while not check_batch_room(options, session, len(batch)):
            flusher.room.clear()
            await flusher.room.wait()
            session = self._require_open().session
        deliveries = parts.dispatcher.deliveries
        result = []
        # No await from the first message to the last: the batch lands in one outbox, so
        # the flusher commits it (with the packet IDs of those entering the window) at once.
        for topic, data, props, expires_at in batch:
            seq = session.publish(topic, data, qos, retain, props, expires_at)
            delivery = deliveries[seq] = Delivery(seq, topic, qos)
            result.append(delivery)
            if self._metrics is not None:
                self._metrics.published(qos)
        if result:
            flusher.wake.set()
            if qos and self._storage.durable:
                await flusher.committed()
        return result

    # --- poison messages (session/poison.py) ---------------------------------------------------

    def set_aside(self) -> list[SetAsideMessage]:
        """Messages set aside as poison, in publish order (see ``poison_after``).

        Each has the message (``.message``: seq, topic, payload, qos, ...), why it was set
        aside (``.reason``) and when (``.at``, Unix time). They stay in the store, never sent,
        until :meth:`retry_set_aside` or :meth:`discard_set_aside`.
        """
        return self._require_open().session.poison.listing()

    async def retry_set_aside(self, seq: int) -> Delivery:
        """Publish the set-aside message ``seq`` again, as a new message at the end of the
        queue; returns its delivery once stored. InvalidInput if ``seq`` is not set aside."""
        parts = self._require_open()
        aside = parts.session.poison.set_aside.get(seq)
        if aside is None:
            raise InvalidInput(f"no set-aside message with seq {seq}")
        message = aside.message
        new_seq = parts.session.retry_set_aside(seq)
        return await self._track(parts, new_seq, message.topic, message.qos)

    async def discard_set_aside(self, seq: int) -> None:
        """Delete the set-aside message ``seq`` from the store for good (once committed).

        InvalidInput if ``seq`` is not set aside.
        """
        parts = self._require_open()
        try:
            parts.session.poison.take(seq)
        except KeyError:
            raise InvalidInput(f"no set-aside message with seq {seq}") from None
        parts.flusher.wake.set()
        await parts.flusher.committed()

    # --- subscriptions -----------------------------------------------------------------------

    async def subscribe(
        self,
        topic_filter: str | Sequence[tuple[str, int | SubscriptionOptions]],
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = RetainHandling.SEND_ON_SUBSCRIBE,
        subscription_identifier: int | None = None,
    ) -> SubscribeRequest:
        """Record subscriptions in the session and return a :class:`SubscribeRequest`.

        ``topic_filter`` is one filter (subscribed at ``qos``) or a sequence of ``(filter, qos)``
        pairs. It returns once the subscriptions are stored; they are sent now if connected, else
        on the next connect, and restored whenever the broker has lost them. ``await`` the
        returned request for the QoS the broker granted.

        MQTT 5 options, stored with each subscription and sent again whenever it is restored:
        ``no_local`` (the broker does not send this client its own messages),
        ``retain_as_published`` (forwarded messages keep their RETAIN flag), ``retain_handling`` (a
        :class:`RetainHandling`: retained messages on subscribe, only for a new subscription,
        or never), and ``subscription_identifier`` (1..268,435,455; the broker names it in
        ``message.properties.subscription_identifiers`` of every message the subscription
        matched). The keyword options apply to every filter given with a plain QoS; a pair
        may give a :class:`SubscriptionOptions` of its own. A shared subscription is
        ``$share/<group>/<filter>`` (checked; ``no_local`` is not allowed on it). With
        ``protocol=ProtocolVersion.V311`` the options are refused; over a 3.1.1 connection of
        ``"auto"`` they are not sent (logged once).
        """
        parts = self._require_open()
        defaults = _subscription_options(no_local, retain_as_published, retain_handling)
        subs = _subscriptions(topic_filter, qos, defaults, subscription_identifier)
        if self._options.protocol == MQTT_3_1_1 and any(
            s.options or s.subscription_id for s in subs
        ):
            raise InvalidInput(
                "subscription options and identifiers need MQTT 5, not protocol=V311"
            )
        token = parts.session.subscribe(subs)
        request = SubscribeRequest(list(dict.fromkeys(s.topic_filter for s in subs)))
        parts.dispatcher.requests[token] = request
        await parts.flusher.committed()
        return request

    async def unsubscribe(self, topic_filter: str | Sequence[str]) -> UnsubscribeRequest:
        """Remove subscriptions from the session; ``await`` the result for the UNSUBACK."""
        parts = self._require_open()
        filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        if not filters:
            raise InvalidInput("unsubscribe needs at least one topic filter")
        for f in filters:
            validate_topic_filter(f)
        token = parts.session.unsubscribe(filters)
        request = UnsubscribeRequest(list(dict.fromkeys(filters)))
        parts.dispatcher.requests[token] = request
        await parts.flusher.committed()
        return request

    # --- request / response (MQTT 5) --------------------------------------------------------

    async def request(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 1,
        *,
        response_topic: str,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Publish a request and wait for its response (MQTT 5 request/response, §4.10).

        The request carries ``response_topic`` and a fresh Correlation Data; the first message
        that arrives with that correlation data is the response: it is returned here and does
        not appear in :attr:`messages`. Subscribe to ``response_topic`` first (a subscription
        is stored and restored like any other). The request itself is published as
        :meth:`publish` publishes, so it is durable at QoS 1/2; the wait is not: after a
        restart, or once ``timeout`` (seconds) raised :class:`TimeoutError`, a late response
        arrives in :attr:`messages` like any message. The responder answers with
        :meth:`respond`.
        """
        validate_topic(response_topic)
        correlation = uuid.uuid4().bytes
        props = (properties or NO_PROPERTIES)._replace(
            response_topic=response_topic, correlation_data=correlation
        )
        waiter: Completion[Message] = Completion()
        responses = self._require_open().dispatcher.responses
        responses[correlation] = waiter
        try:
            await self.publish(topic, payload, qos, properties=props)
            with anyio.fail_after(timeout):
                return await waiter
        finally:
            responses.pop(correlation, None)

    async def respond(
        self,
        request: Message,
        payload: bytes | bytearray | memoryview | str = b"",
        qos: int = 1,
        *,
        properties: Properties | None = None,
    ) -> Delivery:
        """Publish the response to a received request: to its Response Topic, with its
        Correlation Data. :class:`InvalidInput` if the message names no response topic."""
        response_topic = request.properties.response_topic
        if response_topic is None:
            raise InvalidInput(f"the message on {request.topic!r} names no response topic")
        props = properties or NO_PROPERTIES
        if request.properties.correlation_data is not None:
            props = props._replace(correlation_data=request.properties.correlation_data)
        return await self.publish(response_topic, payload, qos, properties=props)

    # --- receiving ---------------------------------------------------------------------------

    @property
    def messages(self) -> AsyncIterator[Message]:
        """Received messages, in arrival order; ends when the client closes.

        Raises the client's fatal error (for example a refused connection) if one ends it.
        """
        return self._iterate_messages()

    async def _iterate_messages(self) -> AsyncIterator[Message]:
        incoming = self._require_open().dispatcher.inbox
        while True:
            try:
                # Like asyncio.Queue.get(): no trip through the event loop while messages
                # are waiting.
                message = incoming.get_nowait()
            except anyio.WouldBlock:
                try:
                    message = await incoming.get()
                except anyio.EndOfStream:
                    break
            except anyio.EndOfStream:
                break
            yield message
        if self._fatal is not None:
            raise self._fatal

    async def ack(self, message: Message) -> None:
        """Acknowledge a received message (``ack="manual"``); returns once that is durable.

        The broker gets the PUBACK (QoS 1) or PUBREC (QoS 2) once every message that arrived
        before this one was acknowledged too: MQTT requires acknowledgements in arrival order,
        so one message left unacknowledged holds back those after it (and, through the
        broker's in-flight limit, further deliveries). A QoS 2 message is recorded in the
        store before this returns and is never delivered again, also after a crash. A message
        not acknowledged when the process dies is delivered again by the broker (at least
        once). Acknowledging twice, a QoS 0 message, or in the automatic mode does nothing;
        after the broker lost the session (CONNACK without it) there is nobody left to tell.
        """
        token = message._ack_token
        if not token or message._acker is None:
            return
        if message._acker is not self:
            raise InvalidInput("this message was received by another client")
        parts = self._require_open()
        session = parts.session
        session.ack(token)
        if session.has_output():
            parts.flusher.wake.set()
            if message.qos == 2 and self._storage.durable:
                await parts.flusher.committed()

    @staticmethod
    def _message_left(session: Session, wake: Signal) -> None:
        """A message left the inbox: with ``max_unread_messages``, held ones may follow."""
        session.message_read()
        if session.has_output() or session.wants_reconnect:
            wake.set()

    @staticmethod
    def _ack_now(session: Session, wake: Signal, message: Message) -> None:
        token = message._ack_token
        if token:
            session.ack(token)
            wake.set()

    # --- state -------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while the connection is up and the session restored on the broker."""
        parts = self._parts
        return parts is not None and parts.dispatcher.ready.is_set() and self._fatal is None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (subscriptions restored).

        After ``timeout`` seconds it raises :class:`~mqtt_persist.errors.ConnectTimeout` (a
        ``TimeoutError``), whose message names the broker, the time waited and the last
        connection error, e.g. ``could not connect to 127.0.0.1:1 within 10s (4 attempts;
        last error: connection refused)``. A fatal error (a refused CONNECT, a broken store)
        is raised as itself.
        """
        parts = self._require_open()
        ready = parts.dispatcher.ready
        with anyio.move_on_after(timeout) as waiting:
            # _fail() sets ready too, to wake this wait: check the fatal error first.
            while True:
                if self._fatal is not None:
                    raise self._fatal
                if ready.is_set():
                    return
                await ready.wait()
        assert timeout is not None and waiting.cancelled_caught
        connection = parts.connection
        raise ConnectTimeout(
            self.hostname, self.port, timeout, connection.failed_attempts, connection.last_error
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the broker acknowledged every queued and in-flight message."""
        parts = self._require_open()
        session, flusher, dispatcher = parts.session, parts.flusher, parts.dispatcher
        with anyio.fail_after(timeout):
            while not settled(session, flusher, dispatcher, requests=False):
                flusher.flushed.clear()
                await flusher.flushed.wait()
                self._require_open()

    @property
    def session_present(self) -> bool | None:
        """Whether the broker still held this client's session at the last connect (CONNACK's
        Session Present); None before the first connection. False after an expired or lost
        broker session, whose subscriptions the client then restored."""
        parts = self._parts
        return parts.dispatcher.session_present if parts is not None else None

    @property
    def protocol_version(self) -> ProtocolVersion | None:
        """The protocol of the current connection (or of the last one), once one was
        accepted: ``ProtocolVersion.V5`` or ``ProtocolVersion.V311``; None before."""
        parts = self._parts
        if parts is None or not parts.dispatcher.connections:
            return None
        return ProtocolVersion(parts.session.protocol_version)

    @property
    def stats(self) -> ClientStats:
        """Current counters."""
        parts = self._parts
        if parts is None:
            return ClientStats(0, 0, 0, 0, 0, 0, 0)
        session = parts.session
        return ClientStats(
            queued=session.queued,
            inflight=session.inflight,
            dropped=session.dropped,
            in_doubt=session.in_doubt,
            requeued=session.requeued,
            duplicates_suppressed=session.duplicates_suppressed,
            connections=parts.dispatcher.connections,
            expired=session.expired,
            refused=session.refused,
            downgraded=session.downgraded,
            set_aside=session.poison.count,
            unread=len(parts.dispatcher.inbox),
            unread_peak=parts.dispatcher.inbox.peak,
            held_back=session.held_back,
            unread_dropped=parts.dispatcher.inbox.dropped,
            unacknowledged=session.unacknowledged,
            shed=session.shed,
        )

    def _require_open(self) -> _Running:
        if self._fatal is not None:
            raise self._fatal
        if self._parts is None or self._closing:
            raise ClientClosed("use the client inside 'async with PersistentClient(...)'")
        return self._parts

    def _fail(self, error: BaseException) -> None:
        """A fatal error: the client stops and every waiter learns why."""
        if self._fatal is None:
            self._fatal = error
            self._log.error("client stopped: %s", error)
        parts = self._parts
        if parts is not None:
            parts.dispatcher.end_messages()
            parts.flusher.room.set()
            parts.dispatcher.ready.set()  # wake wait_connected, which re-checks _fatal
            parts.flusher.flushed.set()


@dataclass(frozen=True, slots=True)
class _Running:
    """What exists while the client is entered: the session and the parts that drive it."""

    session: Session
    dispatcher: EventDispatcher
    connection: ConnectionSupervisor
    flusher: Flusher


#: A SUBSCRIBE's Subscription Identifier is a variable byte integer (MQTT 5 §3.8.2.1.2).
MAX_SUBSCRIPTION_IDENTIFIER = 268_435_455


def _subscription_options(
    no_local: object, retain_as_published: object, retain_handling: object
) -> int:
    """The option bits (besides QoS) of the keyword arguments, checked."""
    for name, value in (("no_local", no_local), ("retain_as_published", retain_as_published)):
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be a bool, not {value!r}")
    if isinstance(retain_handling, bool) or retain_handling not in (0, 1, 2):
        raise InvalidInput(
            f"retain_handling must be a RetainHandling (0, 1 or 2), not {retain_handling!r}"
        )
    options = SubscriptionOptions(0, bool(no_local), bool(retain_as_published), retain_handling)
    return options.to_byte()


def _subscriptions(
    topic_filter: str | Sequence[tuple[str, int | SubscriptionOptions]],
    qos: int,
    defaults: int,
    subscription_id: int | None,
) -> list[StoredSubscription]:
    if subscription_id is not None and (
        isinstance(subscription_id, bool)
        or not isinstance(subscription_id, int)
        or not 1 <= subscription_id <= MAX_SUBSCRIPTION_IDENTIFIER
    ):
        raise InvalidInput(
            f"subscription_identifier must be in 1..{MAX_SUBSCRIPTION_IDENTIFIER}, "
            f"not {subscription_id!r}"
        )
    entries = [(topic_filter, qos)] if isinstance(topic_filter, str) else list(topic_filter)
    if not entries:
        raise InvalidInput("subscribe needs at least one topic filter")
    subs = []
    for f, q in entries:
        validate_topic_filter(f)
        if isinstance(q, SubscriptionOptions):
            try:
                byte = q.to_byte()
            except ValueError as exc:
                raise InvalidInput(f"subscription options of {f!r}: {exc}") from None
            sub_qos, options = byte & 3, byte & ~3
        else:
            sub_qos, options = validate_qos(q), defaults
        if options & 0x04 and is_shared_subscription(f):
            raise InvalidInput(
                f"no_local is not allowed on the shared subscription {f!r} (MQTT 5 §3.8.3.1)"
            )
        subs.append(StoredSubscription(f, sub_qos, False, options, subscription_id))
    return subs
