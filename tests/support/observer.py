"""An independent MQTT observer and publisher built on paho-mqtt 2.x (MQTT 3.1.1, or MQTT 5
with ``protocol=5``, recording each message's properties).

The observer is deliberately *not* our client: end-to-end tests check what mqtt_persist
did by looking at what a third party received from the broker.

``PahoObserver`` runs paho's network loop in its own thread (``loop_start``), so it never
blocks the event loop once entered. Entering it synchronously blocks the caller until
CONNACK and SUBACK; use ``async with`` inside async tests (it enters in a worker thread),
which is *required* when the observer connects through a :class:`FaultProxy` served by the
same event loop. For the same reason use :func:`paho_publish_async` there.

paho reconnects by itself after a lost connection (1-2 s back-off); if the new session is
not ``session_present`` the observer subscribes again, so it keeps observing across broker
restarts and proxy cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode

from mqtt_persist.protocol.packets import NO_PROPERTIES, Properties

__all__ = ["Observed", "PahoObserver", "paho_publish", "paho_publish_async"]

POLL_INTERVAL = 0.01


@dataclass(frozen=True, slots=True)
class Observed:
    """One PUBLISH as the observer received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    #: MQTT 5 observers: the PUBLISH properties as paho decoded them, in our type.
    properties: Properties = NO_PROPERTIES


#: paho's property attribute -> our Properties field, for what a PUBLISH carries.
_PUBLISH_PROPERTIES = {
    "PayloadFormatIndicator": "payload_format_indicator",
    "MessageExpiryInterval": "message_expiry_interval",
    "ContentType": "content_type",
    "ResponseTopic": "response_topic",
    "CorrelationData": "correlation_data",
    "SubscriptionIdentifier": "subscription_identifiers",
    "UserProperty": "user_properties",
}


def from_paho(props: PahoProperties | None) -> Properties:
    """A PUBLISH's properties as paho decoded them, in our type (for comparing)."""
    if props is None:
        return NO_PROPERTIES
    values: dict[str, Any] = {}
    for paho_name, field in _PUBLISH_PROPERTIES.items():
        value = getattr(props, paho_name, None)
        if value is None:
            continue
        if field == "user_properties":
            value = tuple(tuple(pair) for pair in value)
        elif field == "subscription_identifiers":
            value = tuple(value)
        elif field == "correlation_data":
            value = bytes(value)
        values[field] = value
    return Properties(**values)


def to_paho(props: Properties) -> PahoProperties:
    """Our PUBLISH properties as paho's, for publishing with paho."""
    paho = PahoProperties(PacketTypes.PUBLISH)
    for paho_name, field in _PUBLISH_PROPERTIES.items():
        value = getattr(props, field)
        if value is None or value == ():
            continue
        setattr(paho, paho_name, list(value) if field == "user_properties" else value)
    return paho


def _new_client(
    client_id: str | None, clean_session: bool, prefix: str, protocol: int = 4
) -> mqtt.Client:
    client_id = client_id or f"{prefix}-{uuid.uuid4().hex[:12]}"
    if protocol == 5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    return client


def _shutdown(client: mqtt.Client) -> None:
    """``disconnect()`` and end paho's loop thread without waiting out a reconnect back-off.

    ``loop_stop()`` joins the thread, which may be inside ``time.sleep(1)`` of its reconnect
    back-off when the connection is down: that would add a second to every failure path. A
    connected client is joined (its DISCONNECT goes out first); a disconnected one is told to
    stop and left to exit by itself (daemon thread, it cannot reconnect after disconnect()).
    """
    was_connected = client.is_connected()
    client.disconnect()
    thread = client._thread
    if thread is None or thread is threading.current_thread():
        return
    client._thread_terminate = True
    thread.join(timeout=5.0 if was_connected else 0.05)


class PahoObserver:
    """Subscribe to ``topics`` and record every message received.

    >>> with PahoObserver(broker.host, broker.port, "t/#") as obs:
    ...     paho_publish(broker.host, broker.port, "t/1", [b"a", b"b"])
    ...     assert obs.wait_for(2)
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str] | str,
        qos: int = 2,
        client_id: str | None = None,
        clean_session: bool = True,
        *,
        connect_timeout: float = 10.0,
        keepalive: int = 60,
        protocol: int = 4,
    ) -> None:
        self.host = host
        self.port = port
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.qos = qos
        self.clean_session = clean_session
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        #: 4: MQTT 3.1.1; 5: MQTT 5 (a clean start, and no session kept after it).
        self.protocol = protocol
        self.client = _new_client(client_id, clean_session, "observer", protocol)
        self.client_id: str = self.client._client_id.decode()
        self._cond = threading.Condition()
        self._messages: list[Observed] = []
        self._connected = False
        self._subscribed = False
        self._sub_mid: int | None = None
        self._connect_error: str | None = None
        #: CONNACK session_present flag of the most recent connection.
        self.session_present: bool | None = None
        #: Number of successful CONNACKs and of lost/closed connections so far.
        self.connects = 0
        self.disconnects = 0
        #: SUBACK reason codes of the most recent subscription.
        self.granted: list[int] = []
        #: SUBACKs granted so far: one more each time the observer (re)subscribed.
        self.subacks = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._connect_error = f"CONNACK refused: {reason_code}"
                self._cond.notify_all()
                return
            self.connects += 1
            self._connected = True
            self.session_present = bool(flags.session_present)
            resubscribe = not self.session_present or not self._subscribed
            self._cond.notify_all()
        if resubscribe:
            self._subscribe()

    def _subscribe(self) -> None:
        result, mid = self.client.subscribe([(t, self.qos) for t in self.topics])
        with self._cond:
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._sub_mid = mid
            else:
                self._connect_error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
                self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code_list: list[ReasonCode],
        properties: Any,
    ) -> None:
        with self._cond:
            self.granted = [rc.value for rc in reason_code_list]
            if any(rc.is_failure for rc in reason_code_list):
                self._connect_error = f"SUBACK refused: {self.granted}"
            else:
                self._subscribed = True
                self.subacks += 1
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._cond:
            self.disconnects += 1
            if not self._connected and self._connect_error is None:
                self._connect_error = f"connection closed before CONNACK ({reason_code})"
            self._connected = False
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        obs = Observed(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            dup=bool(msg.dup),
            properties=from_paho(getattr(msg, "properties", None))
            if self.protocol == 5
            else NO_PROPERTIES,
        )
        with self._cond:
            self._messages.append(obs)
            self._cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, subscribe and wait for SUBACK (blocking). Raises ConnectionError."""
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        deadline = time.monotonic() + self.connect_timeout
        with self._cond:
            while not self._subscribed and self._connect_error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            ok, error = self._subscribed, self._connect_error
        if not ok:
            self.stop()
            raise ConnectionError(
                f"observer {self.client_id} could not subscribe on {self.host}:{self.port}: "
                f"{error or f'timed out after {self.connect_timeout}s'}"
            )

    def stop(self) -> None:
        """Disconnect cleanly (an offline clean_session=False session stays on the broker)."""
        _shutdown(self.client)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- reading -----------------------------------------------------------------------------
    @property
    def messages(self) -> list[Observed]:
        """A snapshot of everything received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def count(self) -> int:
        with self._cond:
            return len(self._messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.messages if topic is None or m.topic == topic]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` messages were received; False on timeout."""
        return self.wait_until(lambda: len(self._messages) >= n, timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate()`` (evaluated under the observer's lock) is true."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    async def await_count(self, n: int, timeout: float = 10.0) -> bool:
        """Like :meth:`wait_for` but polls without blocking the event loop."""
        return await self.await_until(lambda: len(self._messages) >= n, timeout)

    async def await_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10.0,
    ) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if predicate():
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_INTERVAL)

    def _has_numbers(self, wanted: set[int]) -> Callable[[], bool]:
        """A predicate (for :meth:`wait_until`): every number in ``wanted`` arrived as a payload
        (``b"17"``, or ``b"17 "`` followed by padding).

        It parses each message once, however often it is evaluated.
        """
        seen: set[int] = set()
        done = 0

        def check() -> bool:
            nonlocal done
            messages = self._messages
            for message in messages[done:]:
                with contextlib.suppress(ValueError):
                    seen.add(int(message.payload.split(b" ", 1)[0]))
            done = len(messages)
            return wanted <= seen

        return check

    def wait_numbers(self, wanted: set[int], timeout: float = 10.0) -> bool:
        """Block until every number in ``wanted`` arrived as a payload ``str(n)`` (or
        ``str(n)`` and a space and padding)."""
        return self.wait_until(self._has_numbers(wanted), timeout)

    async def await_numbers(self, wanted: set[int], timeout: float = 10.0) -> bool:
        """Like :meth:`wait_numbers`, without blocking the event loop."""
        return await self.await_until(self._has_numbers(wanted), timeout)

    def __repr__(self) -> str:
        return (
            f"<PahoObserver {self.client_id} {self.host}:{self.port} topics={self.topics} "
            f"received={self.count()}>"
        )


def paho_publish(
    host: str,
    port: int,
    topic: str,
    payloads: Sequence[bytes],
    qos: int = 1,
    client_id: str | None = None,
    *,
    retain: bool = False,
    timeout: float = 10.0,
    properties: Properties | None = None,
) -> None:
    """Publish every payload with paho, wait until each is acknowledged, disconnect cleanly.

    "Acknowledged" is paho's ``wait_for_publish``: PUBACK for QoS 1, PUBCOMP for QoS 2,
    written to the socket for QoS 0. Raises ``ConnectionError``/``TimeoutError``. With
    ``properties`` it speaks MQTT 5 and sends them with every message.
    """
    client = _new_client(client_id, True, "publisher", 5 if properties is not None else 4)
    paho_properties = to_paho(properties) if properties is not None else None
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        if reason_code.is_failure:
            failure.append(str(reason_code))
        connected.set()

    def on_disconnect(
        client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        if not connected.is_set():
            failure.append(f"closed before CONNACK ({reason_code})")
            connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    deadline = time.monotonic() + timeout
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(timeout) or failure:
            raise ConnectionError(
                f"paho_publish could not connect to {host}:{port}: {failure or 'timeout'}"
            )
        infos = [
            client.publish(topic, p, qos=qos, retain=retain, properties=paho_properties)
            for p in payloads
        ]
        for i, info in enumerate(infos):
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(
                    f"paho_publish: message {i}/{len(infos)} to {topic!r} not acknowledged "
                    f"within {timeout}s"
                )
    finally:
        _shutdown(client)


async def paho_publish_async(
    host: str,
    port: int,
    topic: str,
    payloads: Sequence[bytes],
    qos: int = 1,
    client_id: str | None = None,
    *,
    retain: bool = False,
    timeout: float = 10.0,
    properties: Properties | None = None,
) -> None:
    """:func:`paho_publish` in a worker thread, for async tests (and proxies on this loop)."""
    await asyncio.to_thread(
        paho_publish,
        host,
        port,
        topic,
        payloads,
        qos,
        client_id,
        retain=retain,
        timeout=timeout,
        properties=properties,
    )
