"""The public client: :class:`PersistentClient`, the I/O shell around the sans-IO session.

This module holds the constructor and the connection state; the rest of the public API comes
from mixins split by job, each a :class:`~mqtt_persist.client.base.ClientBase`:
``lifecycle.py`` (``async with``), ``publish_api.py``, ``subscribe_api.py``, ``receive_api.py``
(``messages`` and ``ack``) and ``poison_api.py``; ``stats.py`` builds :class:`ClientStats`.
The running parts are named tasks in one task group, entered and left with the client:

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
from collections.abc import Mapping, Sequence
from typing import Literal

import anyio

from mqtt_persist.backoff import Backoff
from mqtt_persist.client.base import ClientBase
from mqtt_persist.client.exit import settled
from mqtt_persist.client.lifecycle import LifecycleAPI
from mqtt_persist.client.options import AckMode, ClientOptions, ProtocolChoice, TransportChoice
from mqtt_persist.client.poison_api import PoisonAPI
from mqtt_persist.client.publish_api import PublishAPI
from mqtt_persist.client.receive_api import ReceiveAPI
from mqtt_persist.client.stats import ClientStats, build_stats
from mqtt_persist.client.storage import SessionStatus, SessionStorage
from mqtt_persist.client.subscribe_api import SubscribeAPI
from mqtt_persist.compat import Compat
from mqtt_persist.errors import ConnectTimeout
from mqtt_persist.log import LOGGER_NAME, client_logger
from mqtt_persist.metrics import MetricsSink
from mqtt_persist.protocol.packets import ProtocolVersion, Will
from mqtt_persist.session.machine import QueueFullPolicy
from mqtt_persist.stores.base import SessionStore
from mqtt_persist.stores.memory import MemoryStore
from mqtt_persist.tls import resolve_tls

__all__ = ["ClientStats", "PersistentClient"]


class PersistentClient(LifecycleAPI, PublishAPI, SubscribeAPI, ReceiveAPI, PoisonAPI, ClientBase):
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
            (it answers the MQTT 5 CONNECT with "unacceptable protocol version", or closes two
            MQTT 5 CONNECTs in a row without answering and then accepts a 3.1.1 CONNECT at
            once: one unanswered close may be a network cut, and MQTT 5 is tried again).
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
            store either way and is sent by the next client with the same id and store. The
            last commit and the DISCONNECT after the wait are bounded by ``connect_timeout``:
            a broker that stopped reading holds the exit that long, whatever ``exit_timeout``.
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
        self._session = None
        self._parts = None
        self._task_group = None
        self._exit_stack = None
        self._fatal = None
        self._entered = False
        self._closing = False

    # --- state -------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while the connection is up and the session restored on the broker."""
        parts = self._parts
        return (
            parts is not None
            and parts.dispatcher.ready.is_set()
            and self._fatal is None
            and not self._closing
        )

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (subscriptions restored).

        After ``timeout`` seconds it raises :class:`~mqtt_persist.errors.ConnectTimeout` (a
        ``TimeoutError``), whose message names the broker, the time waited and the last
        connection error, e.g. ``could not connect to 127.0.0.1:1 within 10s (4 attempts;
        last error: connection refused)``. A fatal error (a refused CONNECT, a broken store)
        is raised as itself; :class:`~mqtt_persist.errors.ClientClosed` if the client closes.
        """
        parts = self._require_open()
        ready = parts.dispatcher.ready
        with anyio.move_on_after(timeout) as waiting:
            # _fail() and closing set ready too, to wake this wait: check those first.
            while True:
                self._require_open()
                if ready.is_set():
                    return
                await ready.wait()
        assert timeout is not None and waiting.cancelled_caught
        connection = parts.connection
        raise ConnectTimeout(
            self.hostname, self.port, timeout, connection.failed_attempts, connection.last_error
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the broker acknowledged every queued and in-flight message.

        Raises :class:`TimeoutError` after ``timeout`` seconds, the client's fatal error if
        one stops it, and :class:`~mqtt_persist.errors.ClientClosed` if the client closes.
        """
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
        return build_stats(self._parts)
