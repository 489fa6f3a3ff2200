"""What one connection allows: the protocol's rules and, on MQTT 5, the broker's CONNACK.

MQTT 3.1.1 tells the client nothing about the broker's limits, so its terms are the client's own
settings (and the in-flight guesses documented on :class:`SessionConfig`). MQTT 5's CONNACK
announces them: Receive Maximum (how many QoS 1/2 messages may be unacknowledged at the broker),
Maximum Packet Size, Maximum QoS, Retain Available, Server Keep Alive, the Session Expiry
Interval the broker really grants, and whether it takes subscription identifiers. They hold for
that connection only and are read afresh from every CONNACK (MQTT 5 §3.2.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_persist.protocol.packets import MQTT_3_1_1, MQTT_5, ConnAck
from mqtt_persist.session.config import SessionConfig


@dataclass(slots=True)
class ConnectionTerms:
    """The limits the session keeps on one connection."""

    protocol_version: int = MQTT_3_1_1
    #: QoS 1/2 messages sent and not yet acknowledged, at most.
    send_window: int = 100
    #: QoS 2 flows among them, at most.
    qos2_window: int = 19
    #: The broker's Maximum Packet Size (None: the protocol's).
    max_packet_size: int | None = None
    #: The highest QoS the broker takes from us.
    maximum_qos: int = 2
    retain_available: bool = True
    #: Whether a SUBSCRIBE may carry a Subscription Identifier.
    subscription_identifiers: bool = True
    #: Seconds between PINGREQs on an idle link (the broker's Server Keep Alive wins).
    keepalive: int = 60
    #: The Session Expiry Interval the broker granted in CONNACK, if it said one.
    session_expiry_interval: int | None = None
    #: The client identifier the broker made up (it never should for a persistent session).
    assigned_client_id: str | None = None
    #: Whether some message could be one this broker cannot take, so that each is checked: a
    #: plain field, read once per window refill (``accepted_terms`` sets it).
    restricted: bool = False

    @property
    def v5(self) -> bool:
        """Whether this connection speaks MQTT 5."""
        return self.protocol_version == MQTT_5


def initial_terms(config: SessionConfig, protocol_version: int) -> ConnectionTerms:
    """The terms before CONNACK: our own settings, and the 3.1.1 QoS 2 guess."""
    return ConnectionTerms(
        protocol_version=protocol_version,
        send_window=config.max_inflight,
        qos2_window=config.max_inflight_qos2,
        keepalive=config.keepalive,
    )


def accepted_terms(
    config: SessionConfig, protocol_version: int, connack: ConnAck
) -> ConnectionTerms:
    """The terms an accepting CONNACK sets for its connection."""
    terms = initial_terms(config, protocol_version)
    if protocol_version != MQTT_5:
        return terms
    props = connack.properties
    if props.receive_maximum is not None:
        # Receive Maximum counts QoS 1 and QoS 2 together and is the broker's real quota, so
        # it replaces the 3.1.1 QoS 2 guess (MQTT 5 §3.3.4, §4.9).
        terms.send_window = min(config.max_inflight, props.receive_maximum)
    # QoS 2 flows leave one slot of it free, for the reason the 3.1.1 guess is 19 of 20: a
    # QoS 2 flow holds a slot at the broker until PUBREL, and mosquitto 2.0 queues (rather
    # than takes) a QoS 2 message that finds the quota used up. Measured in the SIGKILL cycles
    # (tests/test_crash.py, MQTT 5, quota 20): QoS 2 messages arrived out of order in 3 runs of
    # 10 with all 20 slots open to QoS 2, in none of 18 with 19.
    terms.qos2_window = max(1, terms.send_window - 1)
    terms.max_packet_size = props.maximum_packet_size
    if props.maximum_qos is not None:
        terms.maximum_qos = props.maximum_qos
    if props.retain_available is not None:
        terms.retain_available = props.retain_available
    if props.subscription_identifier_available is not None:
        terms.subscription_identifiers = props.subscription_identifier_available
    if props.server_keep_alive is not None:
        terms.keepalive = props.server_keep_alive
    terms.session_expiry_interval = props.session_expiry_interval
    terms.assigned_client_id = props.assigned_client_identifier
    terms.restricted = (
        terms.max_packet_size is not None or terms.maximum_qos < 2 or not terms.retain_available
    )
    return terms
