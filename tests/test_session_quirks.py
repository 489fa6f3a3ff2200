"""Brokers that bend the protocol (issue 9), driven packet by packet with no I/O.

* A broker that downgrades QoS 2 (RabbitMQ answers a QoS 2 PUBLISH with PUBACK): the flow ends
  as DOWNGRADED, its packet ID and QoS 2 slot are free, nothing is resent after a restart.
* A broker that upgrades QoS 1 (PUBREC for a QoS 1 flow): the flow continues as QoS 2 so the
  broker's packet ID is released.
* Acknowledgements for IDs with no open flow: ignored (an unknown PUBREC answered with PUBREL),
  reported once per connection per kind.
"""

from __future__ import annotations

from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import (
    MQTT_5,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from mqtt_persist.protocol.reason_codes import ReasonCode
from mqtt_persist.session.events import Anomaly, PublishRefused
from tests.test_session import Harness, completed, publishes


def anomalies(out: object) -> list[str]:
    return [e.text for e in out.events if isinstance(e, Anomaly)]  # type: ignore[attr-defined]


# --- QoS 2 downgraded to QoS 1 ------------------------------------------------------------------


def test_puback_for_a_qos2_flow_completes_it_as_downgraded_and_frees_id_and_slot() -> None:
    h = Harness(max_inflight_qos2=2)
    h.connect(session_present=False)
    for i in range(6):
        h.session.publish("t", str(i).encode(), 2)
    sent = publishes(h.take())
    assert [p.payload for p in sent] == [b"0", b"1"]  # the QoS 2 window is 2
    outcomes: dict[int, DeliveryOutcome] = {}
    warnings: list[str] = []
    while sent:
        publish = sent.pop(0)
        out = h.feed(PubAck(publish.packet_id))  # type: ignore[arg-type]
        outcomes.update(completed(out))
        warnings += anomalies(out)
        sent += publishes(out)  # the freed slot takes the next one
        assert not h.session._ids.in_use(publish.packet_id)  # type: ignore[arg-type]
        h.assert_journal_consistent()
    assert outcomes == {seq: DeliveryOutcome.DOWNGRADED for seq in range(1, 7)}
    assert h.session.downgraded == 6
    assert h.session.inflight == 0 and h.session._outbound.qos2_inflight == 0
    # One warning per connection, naming what the broker did.
    assert len(warnings) == 1 and "with PUBACK" in warnings[0] and "downgrades" in warnings[0]
    assert h.journal.messages == {}
    # A restart finds nothing to resend; a new connection warns again.
    h = h.restart()
    h.session.publish("t", b"again", 2)
    (publish,) = publishes(h.connect(session_present=True))
    assert publish.payload == b"again" and not publish.dup
    out = h.feed(PubAck(publish.packet_id))  # type: ignore[arg-type]
    assert len(anomalies(out)) == 1


def test_puback_for_a_qos2_flow_past_pubrec_is_ignored_and_pubcomp_still_ends_it() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("t", b"x", 2)
    (publish,) = publishes(h.take())
    packet_id: int = publish.packet_id  # type: ignore[assignment]
    h.feed(PubRec(packet_id))
    out = h.feed(PubAck(packet_id))
    assert completed(out) == {} and out.packets == []
    assert "PUBACK for packet ID" in anomalies(out)[0]
    assert completed(h.feed(PubComp(packet_id))) == {1: DeliveryOutcome.ACKNOWLEDGED}
    assert h.session.downgraded == 0
    h.assert_journal_consistent()


def test_a_v5_puback_with_a_failure_code_for_a_qos2_flow_is_a_refusal() -> None:
    h = Harness(protocol_version=MQTT_5)
    h.connect(session_present=False)
    h.session.publish("t", b"x", 2)
    (publish,) = publishes(h.take())
    out = h.feed(PubAck(publish.packet_id, ReasonCode.NOT_AUTHORIZED))  # type: ignore[arg-type]
    assert [e.reason_code for e in out.events if isinstance(e, PublishRefused)] == [0x87]
    assert h.session.downgraded == 0 and h.journal.messages == {}


# --- QoS 1 upgraded to QoS 2 --------------------------------------------------------------------


def test_pubrec_for_a_qos1_flow_continues_it_as_qos2_across_a_restart() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("t", b"x", 1)
    (publish,) = publishes(h.take())
    packet_id: int = publish.packet_id  # type: ignore[assignment]
    out = h.feed(PubRec(packet_id))
    assert out.packets == [PubRel(packet_id)]
    assert "with PUBREC" in anomalies(out)[0]
    assert h.journal.messages[1].released  # stored before PUBREL goes out
    assert completed(out) == {}
    # A restart resumes with PUBREL, never PUBLISH, under the same ID.
    h = h.restart()
    out = h.connect(session_present=True)
    assert out.packets == [PubRel(packet_id)]
    out = h.feed(PubComp(packet_id))
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}
    assert not h.session._ids.in_use(packet_id)
    h.assert_journal_consistent()


def test_an_upgraded_qos1_flow_is_acknowledged_not_in_doubt_when_the_broker_loses_it() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("t", b"x", 1)
    (publish,) = publishes(h.take())
    h.feed(PubRec(publish.packet_id))  # type: ignore[arg-type]
    h.session.connection_lost()
    h.take()
    out = h.connect(session_present=False)
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}
    assert h.session.in_doubt == 0 and publishes(out) == []
    h.assert_journal_consistent()


# --- acknowledgements for unknown IDs -----------------------------------------------------------


def test_unknown_pubrec_is_answered_with_pubrel_and_its_pubcomp_is_expected() -> None:
    h = Harness()
    h.connect(session_present=False)
    out = h.feed(PubRec(77))
    assert out.packets == [PubRel(77)]
    assert "no message is in flight" in anomalies(out)[0]
    out = h.feed(PubComp(77))
    assert anomalies(out) == [] and out.packets == []
    assert h.journal.messages == {}


def test_unknown_pubrec_on_mqtt5_says_packet_identifier_not_found() -> None:
    h = Harness(protocol_version=MQTT_5)
    h.connect(session_present=False)
    out = h.feed(PubRec(5))
    assert out.packets == [PubRel(5, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)]


def test_unknown_acks_are_reported_once_per_connection_and_kind() -> None:
    h = Harness()
    h.connect(session_present=False)
    out = h.feed(PubAck(9), PubAck(10), PubComp(9), PubComp(10))
    assert len(anomalies(out)) == 2
    assert completed(out) == {} and out.packets == []
    h.session.connection_lost()
    h.take()
    h.connect(session_present=True)
    assert len(anomalies(h.feed(PubAck(9)))) == 1


def test_a_downgrading_broker_never_sees_a_message_twice_over_reconnects() -> None:
    """Issue 9's measurement, in miniature: 40 QoS 2 + 10 QoS 1 against a PUBACK-only broker."""
    h = Harness(max_inflight_qos2=19)
    h.connect(session_present=False)
    for i in range(40):
        h.session.publish("q2", str(i).encode(), 2)
    for i in range(10):
        h.session.publish("q1", str(i).encode(), 1)
    seen: list[bytes] = []
    done: dict[int, DeliveryOutcome] = {}
    pending = publishes(h.take())
    while pending:
        publish = pending.pop(0)
        seen.append(publish.payload)
        out = h.feed(PubAck(publish.packet_id))  # type: ignore[arg-type]
        done.update(completed(out))
        pending += publishes(out)
    assert len(done) == 50 and len(seen) == 50
    h.session.connection_lost()
    h.take()
    assert [p for p in h.connect(session_present=True).packets if isinstance(p, Publish)] == []
