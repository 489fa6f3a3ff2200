"""The outside subscriber that counts what really reached the broker and came out again.

It is paho-mqtt (not any client under test), MQTT 3.1.1, subscribed at QoS 2 to one topic, with
paho's network loop in its own thread (``loop_start``). Every benchmark payload starts with its
index as 8 ASCII digits, so the counter knows exactly which messages arrived, how many distinct
ones, and how many arrived more than once; it timestamps the arrival that completes the set.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

INDEX_DIGITS = 8


def make_payloads(count: int, size: int) -> list[bytes]:
    """``count`` payloads of ``size`` bytes; payload i starts with i as 8 ASCII digits."""
    if size < INDEX_DIGITS:
        raise ValueError(f"payloads need at least {INDEX_DIGITS} bytes to carry their index")
    filler = b"x" * (size - INDEX_DIGITS)
    return [b"%08d" % i + filler for i in range(count)]


class ArrivalCounter:
    """Subscribes to ``topic`` and counts arrivals of payloads 0..expected-1."""

    def __init__(self, host: str, port: int, topic: str, expected: int) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.expected = expected
        self._seen = bytearray(expected)
        self._lock = threading.Lock()
        self.unique = 0
        self.total = 0
        self.duplicates = 0
        #: Payloads that were not ours (wrong index or shape): must stay 0.
        self.foreign = 0
        #: perf_counter() of the arrival that completed the set, and of the latest arrival.
        self.t_complete: float | None = None
        self.t_last: float | None = None
        self._done = threading.Event()
        self._subscribed = threading.Event()
        self._error: str | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-observer-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- paho callbacks (paho's thread) -------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._error = f"CONNACK refused: {rc}"
            self._subscribed.set()
            return
        result, _mid = client.subscribe(self.topic, qos=2)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
            self._subscribed.set()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        if any(code.is_failure for code in codes):
            self._error = f"SUBACK refused: {codes}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        payload = message.payload
        try:
            index = int(payload[:INDEX_DIGITS])
        except ValueError:
            index = -1
        with self._lock:
            self.total += 1
            self.t_last = now
            if not 0 <= index < self.expected:
                self.foreign += 1
                return
            if self._seen[index]:
                self.duplicates += 1
                return
            self._seen[index] = 1
            self.unique += 1
            if self.unique == self.expected:
                self.t_complete = now
                self._done.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe at QoS 2 and wait for the SUBACK (blocking)."""
        self._client.connect(self.host, self.port, keepalive=60)
        self._client.loop_start()
        if not self._subscribed.wait(timeout) or self._error:
            self.stop()
            raise ConnectionError(
                f"observer could not subscribe to {self.topic!r}: {self._error or 'timeout'}"
            )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def snapshot(self) -> tuple[int, int, int, float | None, float | None]:
        """(unique, total, duplicates, t_complete, t_last), consistent with each other."""
        with self._lock:
            return self.unique, self.total, self.duplicates, self.t_complete, self.t_last

    @property
    def complete(self) -> bool:
        return self._done.is_set()
