"""Brokers that bend the protocol (issue 9), driven packet by packet with no I/O.

* A broker that downgrades QoS 2 (RabbitMQ answers a QoS 2 PUBLISH with PUBACK): the flow ends
  as DOWNGRADED, its packet ID and QoS 2 slot are free, nothing is resent after a restart.
* A broker that upgrades QoS 1 (PUBREC for a QoS 1 flow): the flow continues as QoS 2 so the
  broker's packet ID is released.
* Acknowledgements for IDs with no open flow: ignored (an unknown PUBREC answered with PUBREL),
  reported once per connection per kind.
* Poison messages (nats-server closes the connection on a PUBLISH it will not take): set aside
  after ``poison_after`` prompt hang-ups in a row, the rest of the queue goes on in order.
"""

from __future__ import annotations

import pytest

from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import (
    MQTT_5,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
)
from mqtt_persist.protocol.reason_codes import ReasonCode
from mqtt_persist.session.events import (
    SUBSCRIPTION_SUPERSEDED,
    Anomaly,
    ConnectionReady,
    Notice,
    PublishRefused,
    SubscribeCompleted,
)
from mqtt_persist.session.machine import Outbox
from mqtt_persist.session.state import MessageSetAside, SetAsideRemoved
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


# --- poison messages ----------------------------------------------------------------------------


def hang_up(h: Harness, after: float = 0.01) -> Outbox:
    """The broker closes the connection ``after`` seconds after our last write."""
    h.session.connection_lost(h.now + after)
    return h.take()


def notices(out: Outbox) -> list[str]:
    return [e.text for e in out.events if isinstance(e, Notice)]


def test_a_message_the_broker_hangs_up_on_is_set_aside_and_the_rest_go_on_in_order() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("bad topic", b"poison", 1)
    for i in range(3):
        h.session.publish("ok", str(i).encode(), 1)
    first = publishes(h.take())
    assert [p.payload for p in first] == [b"poison", b"0", b"1", b"2"]
    poison_id = first[0].packet_id
    out = hang_up(h)
    for _ in range(2):  # two more connections: the poison is resent first, the broker hangs up
        (again, *_) = publishes(h.connect(session_present=True))
        assert again.payload == b"poison" and again.dup
        out = hang_up(h)
    assert completed(out) == {1: DeliveryOutcome.SET_ASIDE}
    (notice,) = notices(out)
    assert "'bad topic'" in notice and f"packet ID {poison_id}" in notice
    assert isinstance(out.ops[-1], MessageSetAside)
    assert 1 not in h.journal.messages and h.journal.set_aside[1].message.packet_id is None
    assert h.session.poison.count == 1
    assert [a.message.seq for a in h.session.poison.listing()] == [1]
    assert not h.session._ids.in_use(poison_id)  # type: ignore[arg-type]
    h.assert_journal_consistent()
    # The next connection resends the others, in order, and nothing else.
    out = h.connect(session_present=True)
    assert [p.payload for p in publishes(out)] == [b"0", b"1", b"2"]
    done: dict[int, DeliveryOutcome] = {}
    for p in publishes(out):
        done.update(completed(h.feed(PubAck(p.packet_id))))  # type: ignore[arg-type]
    assert done == {2: ACK, 3: ACK, 4: ACK}
    # A restart keeps the set-aside message, aside.
    h = h.restart()
    assert [a.message.payload for a in h.session.poison.listing()] == [b"poison"]
    assert publishes(h.connect(session_present=True)) == []
    h.assert_journal_consistent()


ACK = DeliveryOutcome.ACKNOWLEDGED


@pytest.mark.parametrize(
    "ending",
    [
        "not closed by the broker",  # a keepalive timeout, a protocol error, our own close
        "after an answer",  # the broker said something after our last write
        "long after the write",  # outside poison_window
        "after an acknowledgement",  # the connection made progress: a cut, not a refusal
    ],
)
def test_only_consecutive_prompt_hang_ups_on_the_same_message_count(ending: str) -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("t", b"suspect", 1)
    h.take()
    hang_up(h)
    h.connect(session_present=True)
    hang_up(h)
    h.connect(session_present=True)
    if ending == "not closed by the broker":
        h.session.connection_lost()
    elif ending == "after an answer":
        h.feed(PingResp())
        hang_up(h)
    elif ending == "long after the write":
        hang_up(h, after=h.config.poison_window + 1)
    else:
        (first,) = [p for p in h.wire if isinstance(p, Publish) and p.payload == b"suspect"][-1:]
        h.feed(PubAck(first.packet_id))  # type: ignore[arg-type]
        h.session.publish("t", b"other", 1)
        h.take()
        hang_up(h)  # right after "other" was written, but the connection had made progress
        assert h.session.poison.suspect is None and h.session.poison.strikes == 0
    h.take()
    assert h.session.poison.listing() == []
    # The count started again: two more prompt hang-ups do not set anything aside yet.
    for _ in range(2):
        h.connect(session_present=True)
        out = hang_up(h)
        assert DeliveryOutcome.SET_ASIDE not in completed(out).values()


def test_a_connection_lost_before_connack_neither_strikes_nor_breaks_the_row() -> None:
    h = Harness(poison_after=2)
    h.connect(session_present=False)
    h.session.publish("t", b"suspect", 1)
    h.take()
    hang_up(h)
    h.session.connect(h.now)
    h.take()
    hang_up(h)  # no CONNACK yet: says nothing about the message
    out = h.connect(session_present=True)
    out = hang_up(h)
    assert completed(out) == {1: DeliveryOutcome.SET_ASIDE}


def test_a_qos2_message_set_aside_keeps_its_packet_id_reserved() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("t", b"q2", 2)
    (publish,) = publishes(h.take())
    hang_up(h)
    for _ in range(2):
        h.connect(session_present=True)
        out = hang_up(h)
    assert completed(out) == {1: DeliveryOutcome.SET_ASIDE}
    assert h.session._ids.in_use(publish.packet_id)  # type: ignore[arg-type]
    assert h.session._outbound.qos2_inflight == 0
    h.assert_journal_consistent()


def test_poison_after_zero_never_sets_aside() -> None:
    h = Harness(poison_after=0)
    h.connect(session_present=False)
    h.session.publish("t", b"x", 1)
    h.take()
    for _ in range(5):
        hang_up(h)
        h.connect(session_present=True)
    assert h.session.poison.listing() == [] and h.session.inflight == 1


def poisoned(**config: object) -> Harness:
    h = Harness(poison_after=1, **config)
    h.connect(session_present=False)
    h.session.publish("t", b"poison", 1)
    h.session.publish("t", b"next", 1)
    h.take()
    hang_up(h)
    return h


def test_a_set_aside_message_can_be_retried_as_a_new_message_at_the_end() -> None:
    h = poisoned()
    h.session.publish("t", b"later", 1)
    new_seq = h.session.retry_set_aside(1)
    out = h.take()
    assert new_seq == 4 and h.session.poison.listing() == []
    assert isinstance(out.ops[-1], SetAsideRemoved)
    assert [m.payload for m in h.journal.messages.values()] == [b"next", b"later", b"poison"]
    assert h.journal.set_aside == {}
    h.assert_journal_consistent()
    with pytest.raises(KeyError):
        h.session.retry_set_aside(1)


def test_a_set_aside_message_can_be_discarded_and_stays_discarded_after_a_restart() -> None:
    h = poisoned()
    h.session.poison.take(1)
    h.take()
    assert h.journal.set_aside == {} and h.session.poison.listing() == []
    h.assert_journal_consistent()
    assert h.restart().session.poison.listing() == []
    with pytest.raises(KeyError):
        h.session.poison.take(1)


# --- truthful outcomes: superseded subscribes, a fresh session asked for ------------------------


def test_unsubscribe_before_suback_supersedes_the_subscribe_not_refuses_it() -> None:
    h = Harness()
    h.connect(session_present=False)
    token = h.session.subscribe([("a", 1), ("b", 1)])
    (sub,) = h.take().packets
    out = h.feed()
    h.session.unsubscribe(["a"])
    out = h.take()
    assert not any(isinstance(e, SubscribeCompleted) for e in out.events)  # "b" still waits
    out = h.feed(SubAck(sub.packet_id, [1, 1]))  # type: ignore[union-attr]
    assert SubscribeCompleted(token, (SUBSCRIPTION_SUPERSEDED, 1)) in out.events
    assert set(h.journal.subscriptions) == {"b"}
    h.assert_journal_consistent()


def test_each_subscribe_of_a_filter_on_the_wire_is_answered_by_its_own_suback() -> None:
    h = Harness()
    h.connect(session_present=False)
    first = h.session.subscribe([("a", 0)])
    second = h.session.subscribe([("a", 2)])
    one, two = h.take().packets
    out = h.feed(SubAck(one.packet_id, [0]))  # type: ignore[union-attr]
    assert [e for e in out.events if isinstance(e, SubscribeCompleted)] == [
        SubscribeCompleted(first, (0,))
    ]
    out = h.feed(SubAck(two.packet_id, [2]))  # type: ignore[union-attr]
    assert SubscribeCompleted(second, (2,)) in out.events
    assert h.journal.subscriptions["a"].qos == 2 and h.journal.subscriptions["a"].confirmed


def test_a_subscribe_replaced_while_offline_or_lost_with_its_connection_is_superseded() -> None:
    h = Harness()
    offline = h.session.subscribe([("a", 0)])
    latest = h.session.subscribe([("a", 1)])
    out = h.take()
    assert SubscribeCompleted(offline, (SUBSCRIPTION_SUPERSEDED,)) in out.events
    out = h.connect(session_present=True)
    (sub,) = [p for p in out.packets if isinstance(p, Subscribe)]
    assert list(sub.subscriptions) == [("a", 1)]
    on_wire = h.session.subscribe([("a", 2)])
    h.take()
    h.session.connection_lost()  # both SUBACKs die with the connection; only qos 2 is wanted
    out = h.take()
    assert SubscribeCompleted(latest, (SUBSCRIPTION_SUPERSEDED,)) in out.events
    out = h.connect(session_present=True)
    (sub,) = [p for p in out.packets if isinstance(p, Subscribe)]
    out = h.feed(SubAck(sub.packet_id, [2]))
    assert SubscribeCompleted(on_wire, (2,)) in out.events


@pytest.mark.parametrize("clean_session", [True, False])
def test_connection_ready_says_whether_a_fresh_session_was_asked_for(clean_session: bool) -> None:
    h = Harness(clean_session=clean_session)
    h.connect(session_present=False)
    h.session.publish("t", b"x", 1)
    h.take()
    h.session.connection_lost()
    h.take()
    out = h.connect(session_present=False)
    (ready,) = [e for e in out.events if isinstance(e, ConnectionReady)]
    assert ready == ConnectionReady(False, 1, 0, clean_start=clean_session)


def test_a_flaky_network_that_cuts_busy_connections_sets_nothing_aside() -> None:
    """Cuts every few hundred milliseconds (the fault suite's soak) land right after a write,
    with the oldest message unanswered, time and again; but each connection carried
    acknowledgements before it was cut, so none is a refusal of that message."""
    h = Harness(poison_after=2)
    h.connect(session_present=False)
    h.session.publish("t", b"stuck", 1)
    for i in range(20):
        h.session.publish("t", str(i).encode(), 1)
    h.take()
    for _ in range(6):
        # The broker acknowledges a later message, never the oldest, then the link dies.
        newest = [p for p in h.wire if isinstance(p, Publish)][-1]
        out = h.feed(PubAck(newest.packet_id))  # type: ignore[arg-type]
        h.session.publish("t", b"more", 1)
        h.take()
        out = hang_up(h)
        assert DeliveryOutcome.SET_ASIDE not in completed(out).values()
        h.connect(session_present=True)
    assert h.session.poison.listing() == [] and h.session.poison.strikes == 0
