"""The session state machine over MQTT 5, driven packet by packet with no I/O.

What MQTT 5 changes in the session: CONNECT announces the session's lifetime and our limits,
CONNACK's terms bound the outbound window (Receive Maximum, also for resumed flows) and what may
be sent at all, reason codes end flows, a message's expiry runs while it waits, the broker may
DISCONNECT with a reason, and the inbound side enforces our Receive Maximum and topic aliases.
"""

from __future__ import annotations

import pytest

from mqtt_persist.errors import ClientIdAssigned, ProtocolError, ServerDisconnected
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from mqtt_persist.protocol.reason_codes import ReasonCode
from mqtt_persist.session.events import (
    MessageReceived,
    Notice,
    PublishCompleted,
    PublishRefused,
)
from mqtt_persist.session.machine import Outbox, Session, SessionConfig
from mqtt_persist.session.state import MessageRemoved, SessionState

CID = "dev-5"


class Clock:
    """Unix time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class V5:
    """A session on MQTT 5 with a hand-driven wall clock, and the journal it wrote."""

    def __init__(self, state: SessionState | None = None, **config: object) -> None:
        config.setdefault("protocol_version", MQTT_5)
        self.config = SessionConfig(client_id=CID, **config)  # type: ignore[arg-type]
        self.clock = Clock()
        self.journal = state.copy() if state else SessionState(CID)
        self.session = Session(self.config, state.copy() if state else None, clock=self.clock)

    def take(self) -> Outbox:
        out = self.session.take(0.0)
        self.journal.apply_all(out.ops)
        return out

    def connect(self, session_present: bool = False, **connack: object) -> Outbox:
        self.session.connect(0.0)
        (connect,) = self.take().packets
        assert isinstance(connect, Connect)
        self.session.receive(ConnAck(session_present, 0, Properties(**connack)))  # type: ignore[arg-type]
        return self.take()

    def feed(self, *packets: object) -> Outbox:
        for packet in packets:
            self.session.receive(packet)  # type: ignore[arg-type]
        return self.take()

    def restart(self, **config: object) -> V5:
        successor = V5(self.journal, **config)
        successor.clock = self.clock
        successor.session = Session(successor.config, self.journal.copy(), clock=self.clock)
        return successor


def publishes(out: Outbox) -> list[Publish]:
    return [p for p in out.packets if isinstance(p, Publish)]


def completed(out: Outbox) -> dict[int, DeliveryOutcome]:
    return {e.seq: e.outcome for e in out.events if isinstance(e, PublishCompleted)}


def refused(out: Outbox) -> dict[int, int]:
    return {e.seq: e.reason_code for e in out.events if isinstance(e, PublishRefused)}


# --- CONNECT -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clean_session", "expiry", "announced"),
    [(False, None, 0xFFFFFFFF), (True, None, None), (False, 300, 300)],
)
def test_connect_announces_the_sessions_lifetime(
    clean_session: bool, expiry: int | None, announced: int | None
) -> None:
    session = Session(
        SessionConfig(
            client_id=CID,
            clean_session=clean_session,
            protocol_version=MQTT_5,
            session_expiry_interval=expiry,
        )
    )
    session.connect(0.0)
    (connect,) = session.take(0.0).packets
    assert isinstance(connect, Connect)
    assert connect.protocol_level == MQTT_5 and connect.clean_start is clean_session
    assert connect.properties.session_expiry_interval == announced


def test_connect_announces_our_limits_and_3_1_1_announces_none() -> None:
    config = SessionConfig(
        client_id=CID, receive_maximum=7, max_packet_size=4096, topic_alias_maximum=3
    )
    session = Session(config)
    session.connect(0.0, MQTT_5)
    (connect,) = session.take(0.0).packets
    assert isinstance(connect, Connect)
    props = connect.properties
    assert (props.receive_maximum, props.maximum_packet_size, props.topic_alias_maximum) == (
        7,
        4096,
        3,
    )
    session.connection_lost()
    session.connect(0.0, MQTT_3_1_1)
    (connect,) = session.take(0.0).packets
    assert isinstance(connect, Connect)
    assert connect.protocol_level == MQTT_3_1_1 and not connect.properties


# --- Receive Maximum bounds the window ---------------------------------------------------------


def test_receive_maximum_bounds_qos1_and_qos2_together() -> None:
    h = V5(max_inflight=100, max_inflight_qos2=19)
    h.connect(receive_maximum=3)
    for i in range(6):
        h.session.publish("t", str(i).encode(), 1 + i % 2)
    sent = publishes(h.take())
    assert [p.payload for p in sent] == [b"0", b"1", b"2"]
    out = h.feed(PubAck(sent[0].packet_id))
    assert [p.payload for p in publishes(out)] == [b"3"]
    assert h.session.inflight == 3


def test_resumed_flows_beyond_a_smaller_receive_maximum_wait_in_order() -> None:
    h = V5(max_inflight=10)
    h.connect(receive_maximum=10)
    for i in range(5):
        h.session.publish("t", str(i).encode(), 1)
    first = publishes(h.take())
    assert len(first) == 5
    h2 = h.restart(max_inflight=10)
    out = h2.connect(session_present=True, receive_maximum=2)
    h2.session.publish("t", b"new", 1)
    out2 = h2.take()
    resent = publishes(out) + publishes(out2)
    assert [(p.payload, p.dup) for p in resent] == [(b"0", True), (b"1", True)]
    sent = [p.payload for p in resent]
    while h2.session.inflight:
        on_wire = [pid for pid in h2.session._outbound.inflight if pid not in held_ids(h2)]
        sent += [p.payload for p in publishes(h2.feed(PubAck(on_wire[0])))]
    assert sent == [b"0", b"1", b"2", b"3", b"4", b"new"]


def held_ids(h: V5) -> set[int]:
    return {m.packet_id for m in h.session._outbound.held if m.packet_id is not None}


# --- reason codes ------------------------------------------------------------------------------


def test_puback_with_a_failure_reason_ends_the_flow_refused_and_removed() -> None:
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 1)
    (pub,) = publishes(h.take())
    out = h.feed(PubAck(pub.packet_id, ReasonCode.NOT_AUTHORIZED, Properties(reason_string="acl")))
    assert refused(out) == {1: ReasonCode.NOT_AUTHORIZED}
    assert [e.reason_string for e in out.events if isinstance(e, PublishRefused)] == ["acl"]
    assert MessageRemoved(1) in out.ops and h.journal.messages == {}
    assert h.session.refused == 1 and h.session.inflight == 0


def test_pubrec_with_a_failure_reason_ends_the_flow_without_pubrel() -> None:
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 2)
    (pub,) = publishes(h.take())
    out = h.feed(PubRec(pub.packet_id, ReasonCode.QUOTA_EXCEEDED))
    assert refused(out) == {1: ReasonCode.QUOTA_EXCEEDED}
    assert not any(isinstance(p, PubRel) for p in out.packets)
    assert h.journal.messages == {}


def test_no_matching_subscribers_is_a_success() -> None:
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 1)
    (pub,) = publishes(h.take())
    out = h.feed(PubAck(pub.packet_id, ReasonCode.NO_MATCHING_SUBSCRIBERS))
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}


# --- message expiry ----------------------------------------------------------------------------


def test_each_send_carries_what_is_left_of_the_expiry() -> None:
    h = V5()
    h.session.publish("t", b"x", 1, expires_at=h.clock.now + 60)
    h.take()
    h.clock.now += 10.5
    (pub,) = publishes(h.connect())
    assert pub.properties.message_expiry_interval == 50  # 49.5 s left, rounded up
    h.session.connection_lost()
    h.clock.now += 20
    (again,) = publishes(h.connect(session_present=True))
    assert again.dup and again.properties.message_expiry_interval == 30


def test_a_message_that_expired_while_queued_is_not_sent_and_is_reported() -> None:
    h = V5()
    h.session.publish("t", b"old", 1, expires_at=h.clock.now + 5)
    h.session.publish("t", b"fresh", 1)
    h.session.publish("t", b"q0-old", 0, expires_at=h.clock.now + 5)
    h.take()
    h.clock.now += 6
    out = h.connect()
    assert [p.payload for p in publishes(out)] == [b"fresh"]
    assert completed(out) == {1: DeliveryOutcome.EXPIRED, 3: DeliveryOutcome.EXPIRED}
    assert MessageRemoved(1) in out.ops and h.session.expired == 2
    assert set(h.journal.messages) == {2}


def test_a_qos1_message_that_expired_in_flight_is_dropped_on_resume() -> None:
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 1, expires_at=h.clock.now + 5)
    (pub,) = publishes(h.take())
    h.session.connection_lost()
    h.clock.now += 6
    out = h.connect(session_present=True)
    assert publishes(out) == [] and completed(out) == {1: DeliveryOutcome.EXPIRED}
    assert not h.session._ids.in_use(pub.packet_id)  # type: ignore[arg-type]
    assert h.journal.messages == {}


@pytest.mark.parametrize(
    ("pubcomp_code", "outcome"),
    [
        (ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, DeliveryOutcome.EXPIRED),
        # Not proof the broker had it: mosquitto 2.0.11 answers PUBCOMP 0 for any ID.
        (ReasonCode.SUCCESS, DeliveryOutcome.IN_DOUBT),
    ],
)
def test_a_qos2_message_that_expired_in_flight_is_released_not_resent(
    pubcomp_code: int, outcome: DeliveryOutcome
) -> None:
    """The broker may hold the packet ID: only PUBREL frees it, and PUBCOMP says if it had it."""
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 2, expires_at=h.clock.now + 5)
    (pub,) = publishes(h.take())
    h.session.connection_lost()
    h.clock.now += 6
    out = h.connect(session_present=True)
    assert out.packets == [PubRel(pub.packet_id)]  # type: ignore[arg-type]
    assert h.journal.messages[1].released  # a crash now resumes with PUBREL too
    out = h.feed(PubComp(pub.packet_id, pubcomp_code))  # type: ignore[arg-type]
    assert completed(out) == {1: outcome}
    assert h.journal.messages == {}


# --- what the broker announced it cannot take -------------------------------------------------


def test_a_message_over_the_brokers_maximum_packet_size_is_refused_unsent() -> None:
    h = V5()
    h.session.publish("t", b"x" * 200, 1)
    h.session.publish("t", b"small", 1)
    h.take()
    out = h.connect(maximum_packet_size=100)
    assert [p.payload for p in publishes(out)] == [b"small"]
    assert refused(out) == {1: ReasonCode.PACKET_TOO_LARGE}
    assert h.session.refused == 1 and 1 not in h.journal.messages


def test_maximum_qos_and_retain_available_refuse_what_the_broker_cannot_take() -> None:
    h = V5()
    h.session.publish("t", b"q2", 2)
    h.session.publish("t", b"retained", 1, retain=True)
    h.session.publish("t", b"ok", 1)
    h.take()
    out = h.connect(maximum_qos=1, retain_available=False)
    assert [p.payload for p in publishes(out)] == [b"ok"]
    assert refused(out) == {1: ReasonCode.QOS_NOT_SUPPORTED, 2: ReasonCode.RETAIN_NOT_SUPPORTED}


@pytest.mark.parametrize(
    ("pubcomp_code", "refusal"),
    [(0, None), (ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, ReasonCode.QOS_NOT_SUPPORTED)],
)
def test_a_qos2_flow_in_flight_when_the_maximum_qos_drops_is_released_not_refused(
    pubcomp_code: int, refusal: int | None
) -> None:
    """The QoS 2 PUBLISH already went out: the broker, which kept the session, may have taken
    it (its PUBREC lost) and hold the packet ID. Refusing it unsent would report a message the
    broker may deliver as not delivered, and resending it gets us disconnected (mosquitto 2.0
    restarted with ``max_qos 1``: DISCONNECT 0x9B). PUBREL frees the ID; PUBCOMP 0x92 says
    the broker never had it, a successful one proves nothing (mosquitto sends it for any ID)."""
    h = V5()
    h.connect()
    h.session.publish("t", b"x", 2)
    (pub,) = publishes(h.take())
    h.session.connection_lost()
    out = h.connect(session_present=True, maximum_qos=1)
    assert out.packets == [PubRel(pub.packet_id)]  # type: ignore[arg-type]
    assert refused(out) == {} and h.journal.messages[1].released
    out = h.feed(PubComp(pub.packet_id, pubcomp_code))  # type: ignore[arg-type]
    if refusal is None:
        assert completed(out) == {1: DeliveryOutcome.IN_DOUBT} and h.session.in_doubt == 1
    else:
        assert refused(out) == {1: refusal} and completed(out) == {}
    assert h.journal.messages == {} and not h.session.inflight


# --- CONNACK and DISCONNECT --------------------------------------------------------------------


def test_server_keep_alive_replaces_ours() -> None:
    h = V5(keepalive=60)
    h.connect(server_keep_alive=5)
    assert h.session.tick(4.0) == 5.0
    h.session.tick(5.0)
    assert h.take().packets == [PingReq()]


def test_an_assigned_client_identifier_is_refused_for_a_persistent_session() -> None:
    h = V5()
    h.session.connect(0.0)
    h.take()
    with pytest.raises(ClientIdAssigned, match="auto-123"):
        h.session.receive(ConnAck(False, 0, Properties(assigned_client_identifier="auto-123")))


def test_a_granted_expiry_other_than_asked_is_noticed() -> None:
    h = V5(session_expiry_interval=3600)
    out = h.connect(session_expiry_interval=60)
    assert h.session.terms.session_expiry_interval == 60
    assert any(isinstance(e, Notice) and "60 s" in e.text for e in out.events)


def test_a_broker_disconnect_is_a_typed_error_with_its_reason() -> None:
    h = V5()
    h.connect()
    with pytest.raises(ServerDisconnected) as caught:
        h.session.receive(
            Disconnect(ReasonCode.SERVER_SHUTTING_DOWN, Properties(reason_string="maintenance"))
        )
    error = caught.value
    assert (error.reason_code, error.reason_string) == (0x8B, "maintenance")
    assert not error.fatal
    assert ServerDisconnected(0x8E, "Session taken over").fatal


def test_a_refused_connack_carries_its_reason_string() -> None:
    h = V5()
    h.session.connect(0.0)
    h.take()
    h.session.receive(ConnAck(False, ReasonCode.BANNED, Properties(reason_string="go away")))
    (event,) = h.take().events
    assert (event.return_code, event.reason_string) == (0x8A, "go away")  # type: ignore[union-attr]


# --- inbound -----------------------------------------------------------------------------------


def test_inbound_properties_reach_the_message() -> None:
    h = V5()
    h.connect()
    props = Properties(user_properties=(("k", "v"),), correlation_data=b"\x01")
    out = h.feed(Publish("in", b"x", 1, packet_id=3, properties=props))
    (received,) = [e.message for e in out.events if isinstance(e, MessageReceived)]
    assert received.properties == props


def test_inbound_topic_aliases_are_resolved_per_connection() -> None:
    h = V5(topic_alias_maximum=2)
    h.connect()
    out = h.feed(
        Publish("long/topic", b"1", properties=Properties(topic_alias=2)),
        Publish("", b"2", properties=Properties(topic_alias=2)),
    )
    messages = [e.message for e in out.events if isinstance(e, MessageReceived)]
    assert [(m.topic, m.payload) for m in messages] == [("long/topic", b"1"), ("long/topic", b"2")]
    assert all(m.properties.topic_alias is None for m in messages)
    h.session.connection_lost()
    h.connect()
    with pytest.raises(ProtocolError) as caught:
        h.session.receive(Publish("", b"3", properties=Properties(topic_alias=2)))
    assert caught.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_a_topic_alias_over_our_maximum_is_a_protocol_error() -> None:
    h = V5(topic_alias_maximum=2)
    h.connect()
    with pytest.raises(ProtocolError) as caught:
        h.session.receive(Publish("t", b"1", properties=Properties(topic_alias=3)))
    assert caught.value.reason_code == ReasonCode.TOPIC_ALIAS_INVALID


def test_a_broker_exceeding_our_receive_maximum_is_a_protocol_error() -> None:
    h = V5(receive_maximum=2)
    h.connect()
    h.feed(Publish("t", b"1", 2, packet_id=1), Publish("t", b"2", 2, packet_id=2))
    h.feed(PubRel(1))  # one flow ends: room for one more
    h.feed(Publish("t", b"3", 2, packet_id=3))
    with pytest.raises(ProtocolError) as caught:
        h.session.receive(Publish("t", b"4", 1, packet_id=4))
    assert caught.value.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED


# --- properties over a 3.1.1 connection --------------------------------------------------------


def test_properties_are_not_sent_over_3_1_1_and_that_is_said_once() -> None:
    h = V5(protocol_version=MQTT_3_1_1)
    for i in range(2):
        h.session.publish("t", str(i).encode(), 1, properties=Properties(content_type="a/b"))
    h.take()
    out = h.connect()
    assert [p.properties for p in publishes(out)] == [Properties(), Properties()]
    assert sum(isinstance(e, Notice) for e in out.events) == 1


def test_expiry_is_kept_locally_over_3_1_1() -> None:
    h = V5(protocol_version=MQTT_3_1_1)
    h.session.publish("t", b"old", 1, expires_at=h.clock.now + 1)
    h.take()
    h.clock.now += 2
    out = h.connect()
    assert publishes(out) == [] and completed(out) == {1: DeliveryOutcome.EXPIRED}
