"""The session state machine, driven packet by packet with no I/O.

Every test plays the broker by hand. The recurring check is the store contract: replaying the
operations the machine emitted onto an empty SessionState gives exactly ``session.snapshot()``,
and a machine restored from that state behaves as the original would (packet IDs are continuous).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_persist.errors import KeepaliveTimeout, ProtocolError, QueueFull
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.protocol.packets import (
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from mqtt_persist.session.events import (
    Anomaly,
    ConnectionReady,
    ConnectRefused,
    MessageReceived,
    PublishCompleted,
    SubscribeCompleted,
    UnsubscribeCompleted,
)
from mqtt_persist.session.machine import ConnectionState, Outbox, Session, SessionConfig
from mqtt_persist.session.packet_ids import PacketIdAllocator, PacketIdsExhausted
from mqtt_persist.session.state import SessionState, StoredMessage

CID = "dev-1"


class Harness:
    """A session plus the journal it wrote, replayed the way every store replays it."""

    def __init__(self, state: SessionState | None = None, **config: object) -> None:
        self.config = SessionConfig(client_id=CID, **config)  # type: ignore[arg-type]
        self.journal = state.copy() if state else SessionState(CID)
        self.session = Session(self.config, state.copy() if state else None)
        self.now = 1000.0
        #: Every packet handed out, across restarts (restart() passes the list on).
        self.wire: list[object] = []

    def take(self) -> Outbox:
        out = self.session.take(self.now)
        self.journal.apply_all(out.ops)
        self.wire.extend(out.packets)
        return out

    def connect(self, session_present: bool) -> Outbox:
        self.session.connect(self.now)
        first = self.take()
        assert isinstance(first.packets[0], Connect)
        self.session.receive(ConnAck(session_present, 0))
        return self.take()

    def feed(self, *packets: object) -> Outbox:
        for packet in packets:
            self.session.receive(packet)  # type: ignore[arg-type]
        return self.take()

    def restart(self, **config: object) -> Harness:
        """A new process: a fresh machine restored from what the store holds."""
        merged = {**self._config_kwargs(), **config}
        successor = Harness(self.journal, **merged)
        limit = successor.config.queue_memory_limit
        if limit:
            # As a store's load(queued_limit=...) would: in-flight all, queued only a prefix.
            partial = self.journal.copy()
            queued = [m for m in partial.messages.values() if m.packet_id is None]
            for m in queued[limit:]:
                del partial.messages[m.seq]
            partial.queued_not_loaded = max(0, len(queued) - limit)
            successor.session = Session(successor.config, partial)
        successor.wire = self.wire
        return successor

    def _config_kwargs(self) -> dict[str, object]:
        c = self.config
        return {
            "max_inflight": c.max_inflight,
            "max_inflight_qos2": c.max_inflight_qos2,
            "keepalive": c.keepalive,
            "queue_memory_limit": c.queue_memory_limit,
            "poison_after": c.poison_after,
        }

    def assert_store_consistent(self) -> None:
        """With a memory limit the machine holds a prefix of the queue; the store holds all."""
        if not self.config.queue_memory_limit:
            self.assert_journal_consistent()
            return
        snapshot = self.session.snapshot()
        for seq, message in snapshot.messages.items():
            assert self.journal.messages.get(seq) == message
        stored_queued = sum(1 for m in self.journal.messages.values() if m.packet_id is None)
        in_memory_qos0 = sum(
            1
            for o in (*self.session._queue.memory, *self.session._queue.overflow_qos0)
            if o.qos == 0
        )
        assert stored_queued == self.session.queued - in_memory_qos0
        assert snapshot.inbound_qos2 == self.journal.inbound_qos2
        assert snapshot.subscriptions == self.journal.subscriptions

    def assert_journal_consistent(self) -> None:
        assert self.journal == self.session.snapshot()


def publishes(out: Outbox) -> list[Publish]:
    return [p for p in out.packets if isinstance(p, Publish)]


def completed(out: Outbox) -> dict[int, DeliveryOutcome]:
    return {e.seq: e.outcome for e in out.events if isinstance(e, PublishCompleted)}


# --- packet IDs --------------------------------------------------------------------------------


def test_allocator_skips_ids_in_use_and_wraps() -> None:
    ids = PacketIdAllocator({65535, 1})
    assert ids.allocate() == 2  # continues after the highest restored ID, wrapping, skipping 1
    ids = PacketIdAllocator({3})
    assert [ids.allocate() for _ in range(3)] == [4, 5, 6]
    ids.release(5)
    assert ids.allocate() == 7  # a released ID is not reused at once


def test_allocator_exhaustion_is_typed() -> None:
    ids = PacketIdAllocator(set(range(1, 65536)))
    with pytest.raises(PacketIdsExhausted):
        ids.allocate()


# --- outgoing flows ----------------------------------------------------------------------------


def test_offline_publish_is_stored_before_any_packet() -> None:
    h = Harness()
    h.session.publish("a", b"1", 1)
    out = h.take()
    assert out.packets == []
    assert len(out.ops) == 1 and h.journal.messages[1].packet_id is None
    h.assert_journal_consistent()


def test_qos1_flow_assigns_id_on_entering_window_and_removes_on_puback() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("a", b"1", 1)
    out = h.take()
    (pub,) = publishes(out)
    assert pub.packet_id is not None and not pub.dup
    assert h.journal.messages[1].packet_id == pub.packet_id  # stored in the same batch
    out = h.feed(PubAck(pub.packet_id))
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}
    assert h.journal.messages == {}
    h.assert_journal_consistent()


def test_qos2_flow_pubrec_then_pubrel_then_pubcomp() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("a", b"1", 2)
    (pub,) = publishes(h.take())
    out = h.feed(PubRec(pub.packet_id))
    assert out.packets == [PubRel(pub.packet_id)]
    assert h.journal.messages[1].released
    out = h.feed(PubComp(pub.packet_id))
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}
    h.assert_journal_consistent()


def test_window_limits_inflight_and_refills_in_order() -> None:
    h = Harness(max_inflight=2)
    h.connect(session_present=False)
    for i in range(5):
        h.session.publish("t", str(i).encode(), 1)
    sent = publishes(h.take())
    assert [p.payload for p in sent] == [b"0", b"1"]
    out = h.feed(PubAck(sent[0].packet_id))
    assert [p.payload for p in publishes(out)] == [b"2"]
    assert h.session.inflight == 2 and h.session.queued == 2
    h.assert_journal_consistent()


def test_qos0_keeps_its_place_in_the_queue_and_is_not_stored() -> None:
    h = Harness(max_inflight=1)
    h.connect(session_present=False)
    h.session.publish("t", b"q1", 1)
    h.session.publish("t", b"q0", 0)
    h.session.publish("t", b"q1b", 1)
    out = h.take()
    # QoS 0 needs no window slot: it follows q1 at once; q1b waits for the slot.
    assert [p.payload for p in publishes(out)] == [b"q1", b"q0"]
    assert completed(out) == {2: DeliveryOutcome.SENT}
    out = h.feed(PubAck(publishes(out)[0].packet_id))
    assert [p.payload for p in publishes(out)] == [b"q1b"]
    h.assert_journal_consistent()


def test_unknown_acks_are_anomalies_not_crashes() -> None:
    h = Harness()
    h.connect(session_present=False)
    out = h.feed(PubAck(9), PubRec(9), PubComp(9))
    # The PUBCOMP answers the PUBREL that frees the broker's ID (tests/test_session_quirks.py).
    assert sum(isinstance(e, Anomaly) for e in out.events) == 2
    assert out.packets == [PubRel(9)]


# --- restore: packet IDs are continuous --------------------------------------------------------


def test_restart_resends_unacked_publish_with_original_id_and_dup() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("a", b"1", 1)
    h.session.publish("a", b"2", 2)
    first = publishes(h.take())
    h2 = h.restart()
    out = h2.connect(session_present=True)
    again = publishes(out)
    assert [(p.packet_id, p.payload, p.dup) for p in again] == [
        (first[0].packet_id, b"1", True),
        (first[1].packet_id, b"2", True),
    ]
    h2.assert_journal_consistent()


def test_restart_after_pubrec_resumes_with_pubrel_never_publish() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("a", b"1", 2)
    (pub,) = publishes(h.take())
    h.feed(PubRec(pub.packet_id))
    h2 = h.restart()
    out = h2.connect(session_present=True)
    assert out.packets == [PubRel(pub.packet_id)]
    out = h2.feed(PubComp(pub.packet_id))
    assert completed(out) == {1: DeliveryOutcome.ACKNOWLEDGED}


def test_restored_ids_are_never_handed_out_again() -> None:
    h = Harness(max_inflight=3)
    h.connect(session_present=False)
    for i in range(3):
        h.session.publish("a", bytes([i]), 1)
    ids = {p.packet_id for p in publishes(h.take())}
    h2 = h.restart(max_inflight=6)
    out = h2.connect(session_present=True)
    h2.session.publish("a", b"new", 1)
    out = h2.take()
    new_ids = {p.packet_id for p in publishes(out) if not p.dup}
    assert new_ids and not (new_ids & ids)


def test_order_is_kept_across_restart() -> None:
    h = Harness(max_inflight=2)
    h.connect(session_present=False)
    for i in range(6):
        h.session.publish("t", str(i).encode(), 1)
    h.take()
    h2 = h.restart()
    out = h2.connect(session_present=True)
    sent = [p.payload for p in publishes(out)]
    for p in publishes(out):
        out2 = h2.feed(PubAck(p.packet_id))
        sent += [q.payload for q in publishes(out2)]
    while h2.session.inflight:
        pending = list(h2.session._outbound.inflight)
        for packet_id in pending:
            sent += [q.payload for q in publishes(h2.feed(PubAck(packet_id)))]
    assert sent == [str(i).encode() for i in range(6)]


# --- the broker lost the session: subscriptions come back --------------------------------------


def test_session_lost_resubscribes_before_ready_and_republishes_as_new() -> None:
    h = Harness()
    h.session.subscribe([("s/#", 1)])
    h.connect(session_present=False)
    h.feed(SubAck(h.session._ids._last, [1]))
    h.session.publish("a", b"q1", 1)
    h.session.publish("a", b"q2", 2)
    h.session.publish("a", b"released", 2)
    sent = publishes(h.take())
    h.feed(PubRec(sent[2].packet_id))
    h.session.connection_lost()

    h.session.connect(h.now)
    h.take()
    h.session.receive(ConnAck(False, 0))
    out = h.take()
    assert h.session.connection_state is ConnectionState.RESUBSCRIBING
    (sub,) = out.packets
    assert isinstance(sub, Subscribe) and sub.subscriptions == [("s/#", 1)]
    assert completed(out) == {3: DeliveryOutcome.IN_DOUBT}
    assert not any(isinstance(e, ConnectionReady) for e in out.events)
    out = h.feed(SubAck(sub.packet_id, [1]))
    ready = [e for e in out.events if isinstance(e, ConnectionReady)]
    assert ready == [ConnectionReady(False, 2, 1)]
    again = publishes(out)
    assert [(p.payload, p.dup) for p in again] == [(b"q1", False), (b"q2", False)]
    assert h.session.in_doubt == 1 and h.session.requeued == 2
    h.assert_journal_consistent()


def test_session_lost_clears_inbound_qos2_ids() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.feed(Publish("x", b"1", 2, packet_id=7))
    assert h.journal.inbound_qos2 == {7}
    h.session.connection_lost()
    h.connect(session_present=False)
    assert h.journal.inbound_qos2 == set()
    out = h.feed(Publish("x", b"new", 2, packet_id=7))
    assert [e.message.payload for e in out.events if isinstance(e, MessageReceived)] == [b"new"]


# --- inbound flows: inbound QoS 2 is delivered once --------------------------------------------


def test_inbound_qos1_delivers_and_acks() -> None:
    h = Harness()
    h.connect(session_present=False)
    out = h.feed(Publish("x", b"1", 1, packet_id=3))
    assert out.packets == [PubAck(3)]
    assert [e.message.payload for e in out.events if isinstance(e, MessageReceived)] == [b"1"]


def test_inbound_qos2_stored_before_pubrec_and_resend_not_redelivered_across_restart() -> None:
    h = Harness()
    h.connect(session_present=False)
    out = h.feed(Publish("x", b"1", 2, packet_id=3))
    assert out.packets == [PubRec(3)] and h.journal.inbound_qos2 == {3}
    h2 = h.restart()
    h2.connect(session_present=True)
    out = h2.feed(Publish("x", b"1", 2, dup=True, packet_id=3))
    assert out.packets == [PubRec(3)]
    assert not any(isinstance(e, MessageReceived) for e in out.events)
    assert h2.session.duplicates_suppressed == 1
    out = h2.feed(PubRel(3))
    assert out.packets == [PubComp(3)] and h2.journal.inbound_qos2 == set()
    out = h2.feed(PubRel(3))  # a late duplicate PUBREL is still answered
    assert out.packets == [PubComp(3)]


# --- subscriptions -----------------------------------------------------------------------------


def test_offline_subscribe_is_sent_on_connect_and_completes() -> None:
    h = Harness()
    token = h.session.subscribe([("a/+", 1), ("b", 2)])
    assert h.take().packets == []
    out = h.connect(session_present=True)
    (sub,) = [p for p in out.packets if isinstance(p, Subscribe)]
    out = h.feed(SubAck(sub.packet_id, [1, SUBACK_FAILURE]))
    assert SubscribeCompleted(token, (1, SUBACK_FAILURE)) in out.events
    assert set(h.journal.subscriptions) == {"a/+"}  # a refused filter is not kept
    assert h.journal.subscriptions["a/+"].confirmed
    h.assert_journal_consistent()


def test_confirmed_subscriptions_are_not_resent_when_session_present() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.subscribe([("a", 1)])
    (sub,) = h.take().packets
    h.feed(SubAck(sub.packet_id, [1]))  # type: ignore[union-attr]
    h2 = h.restart()
    out = h2.connect(session_present=True)
    assert not [p for p in out.packets if isinstance(p, Subscribe)]


def test_unsubscribe_offline_is_sent_later_and_completes() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.subscribe([("a", 1)])
    (sub,) = h.take().packets
    h.feed(SubAck(sub.packet_id, [1]))  # type: ignore[union-attr]
    h.session.connection_lost()
    token = h.session.unsubscribe(["a"])
    h.take()
    assert h.journal.pending_unsubscribes == {"a"}
    h2 = h.restart()
    out = h2.connect(session_present=True)
    (unsub,) = [p for p in out.packets if isinstance(p, Unsubscribe)]
    out = h2.feed(UnsubAck(unsub.packet_id))
    assert h2.journal.pending_unsubscribes == set()
    # The token belonged to the first process; the restored one completes silently.
    assert not any(isinstance(e, UnsubscribeCompleted) and e.token == token for e in out.events)
    h2.assert_journal_consistent()


# --- queue limits: nothing is lost silently ----------------------------------------------------


def test_full_queue_raises_or_drops_oldest() -> None:
    h = Harness(max_queued=2, queue_full="error")
    h.session.publish("a", b"1", 1)
    h.session.publish("a", b"2", 1)
    with pytest.raises(QueueFull):
        h.session.publish("a", b"3", 1)
    h = Harness(max_queued=2, queue_full="drop_oldest")
    for i in range(4):
        h.session.publish("a", str(i).encode(), 1)
    out = h.take()
    assert completed(out) == {1: DeliveryOutcome.DROPPED, 2: DeliveryOutcome.DROPPED}
    assert [m.payload for m in h.journal.messages.values()] == [b"2", b"3"]
    assert h.session.dropped == 2


# --- connection and keepalive ------------------------------------------------------------------


def test_connect_refused_is_reported() -> None:
    h = Harness()
    h.session.connect(h.now)
    h.take()
    out = h.feed(ConnAck(False, 5))
    assert out.events == [ConnectRefused(5)]
    assert h.session.connection_state is ConnectionState.DISCONNECTED


def test_packet_before_connack_is_a_protocol_error() -> None:
    h = Harness()
    h.session.connect(h.now)
    with pytest.raises(ProtocolError):
        h.session.receive(PubAck(1))


def test_keepalive_pings_when_idle_and_times_out_without_answer() -> None:
    h = Harness(keepalive=10)
    h.connect(session_present=False)
    assert h.session.tick(h.now + 5) == h.now + 10
    h.now += 10
    h.session.tick(h.now)
    assert h.take().packets == [PingReq()]
    h.session.receive(PingResp())
    assert h.session.tick(h.now + 1) == h.now + 10
    h.session.tick(h.now + 10)
    with pytest.raises(KeepaliveTimeout):
        h.session.tick(h.now + 20)


def test_disconnect_emits_disconnect_packet() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.disconnect()
    assert h.take().packets == [Disconnect()]


def test_packets_for_a_lost_connection_carry_its_generation() -> None:
    h = Harness()
    h.connect(session_present=False)
    h.session.publish("a", b"1", 1)
    gen = h.session.generation
    h.session.connection_lost()
    out = h.take()
    assert out.packets == [] and out.ops  # ops survive, packets for the dead link do not
    h.session.connect(h.now)
    assert h.session.generation == gen + 1


# --- property: any event sequence is replayable ------------------------------------------------

_actions = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 2), st.sampled_from(["a", "b"])),
        st.tuples(st.just("ack"), st.integers(0, 30)),
        st.tuples(st.just("inbound"), st.integers(1, 5), st.integers(1, 2)),
        st.tuples(st.just("pubrel"), st.integers(1, 5)),
        st.tuples(st.just("subscribe"), st.sampled_from(["x", "y/#", "z/+"])),
        st.tuples(st.just("unsubscribe"), st.sampled_from(["x", "y/#", "z/+"])),
        st.tuples(
            st.just("suback"),
        ),
        st.tuples(
            st.just("drop"),
        ),
        st.tuples(st.just("reconnect"), st.booleans()),
        st.tuples(st.just("restart"), st.booleans()),
        # Issue 9: the broker hangs up right after a write (poison), or downgrades QoS 2.
        st.tuples(
            st.just("hangup"),
        ),
        st.tuples(st.just("downgrade"), st.integers(0, 30)),
        st.tuples(st.just("aside"), st.booleans()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_actions, st.sampled_from([0, 2]))
def test_any_event_sequence_replays_to_the_same_state(
    actions: list[tuple[object, ...]], memory_limit: int
) -> None:
    h = Harness(
        max_inflight=3, max_inflight_qos2=2, queue_memory_limit=memory_limit, poison_after=2
    )
    h.connect(session_present=False)
    sent_order: dict[str, list[bytes]] = {}
    counter = 0
    for action in actions:
        s = h.session
        kind = action[0]
        if kind == "publish":
            counter += 1
            s.publish(action[2], str(counter).encode(), action[1])  # type: ignore[arg-type]
        elif kind == "ack" and s.connection_state is ConnectionState.READY and s._outbound.inflight:
            inflight = s._outbound.inflight
            packet_id = list(inflight)[action[1] % len(inflight)]  # type: ignore[operator]
            out = inflight[packet_id]
            if out.qos == 1:
                s.receive(PubAck(packet_id))
            elif out.released:
                s.receive(PubComp(packet_id))
            else:
                s.receive(PubRec(packet_id))
        elif kind == "inbound" and s.connection_state is not ConnectionState.DISCONNECTED:
            s.receive(Publish("in", b"x", action[2], packet_id=action[1]))  # type: ignore[arg-type]
        elif kind == "pubrel" and s.connection_state is not ConnectionState.DISCONNECTED:
            s.receive(PubRel(action[1]))  # type: ignore[arg-type]
        elif kind == "subscribe":
            s.subscribe([(action[1], 1)])  # type: ignore[list-item]
        elif kind == "unsubscribe":
            s.unsubscribe([action[1]])  # type: ignore[list-item]
        elif kind == "suback" and s.connection_state is not ConnectionState.DISCONNECTED:
            for packet_id, pairs in list(s._subscriptions.subscribe_packets.items()):
                s.receive(SubAck(packet_id, [sub.qos for sub in pairs]))
            for packet_id in list(s._subscriptions.unsubscribe_packets):
                s.receive(UnsubAck(packet_id))
        elif kind == "drop":
            s.connection_lost()
        elif kind == "hangup":
            # The broker hangs up right after a write, and the client is straight back.
            s.connection_lost(h.now)
            h.take()
            s.connect(h.now)
            h.take()
            s.receive(ConnAck(True, 0))
        elif kind == "downgrade" and s.connection_state is ConnectionState.READY:
            qos2 = [i for i, o in s._outbound.inflight.items() if o.qos == 2 and not o.released]
            if qos2:
                s.receive(PubAck(qos2[action[1] % len(qos2)]))  # type: ignore[operator]
        elif kind == "aside" and s.poison.listing():
            seq = s.poison.listing()[0].message.seq
            if action[1]:
                s.retry_set_aside(seq)
            else:
                s.poison.take(seq)
        elif kind == "reconnect":
            s.connection_lost()
            h.take()
            s.connect(h.now)
            h.take()
            s.receive(ConnAck(bool(action[1]), 0))
        elif kind == "restart":
            h.take()
            h = h.restart()
            if action[1]:
                h.connect(session_present=True)
        h.take()
        refill_from(h)
        h.take()
        h.assert_store_consistent()
        # Open flows have unique packet IDs, never reused while open ("packet IDs are continuous").
        ids = [o.packet_id for o in h.session._outbound.inflight.values()]
        assert len(ids) == len(set(ids))
        qos2 = sum(o.qos == 2 for o in h.session._outbound.inflight.values())
        assert qos2 == h.session._outbound.qos2_inflight
        # Only a restore may bring more QoS 2 flows than the limit; new ones never exceed it.
    # Order per topic: first transmissions leave in publish order ("order").
    for p in h.wire:
        if isinstance(p, Publish) and p.topic != "in":
            sent_order.setdefault(p.topic, []).append(p.payload)
    for payloads in sent_order.values():
        first_seen = list(dict.fromkeys(payloads))
        assert first_seen == sorted(first_seen, key=int)


# --- queued messages that live in the store only ----------------------------------------------


def read_queued(journal: SessionState, after_seq: int, limit: int) -> list[StoredMessage]:
    """What every store's read_queued returns, computed from the replayed journal."""
    queued = [m for m in journal.messages.values() if m.packet_id is None and m.seq > after_seq]
    return queued[:limit]


def refill_from(h: Harness) -> None:
    request = h.session.want_refill()
    if request is not None:
        h.session.refill(read_queued(h.journal, *request))


def test_queue_beyond_the_memory_limit_lives_in_the_store_and_comes_back_in_order() -> None:
    h = Harness(max_inflight=2, queue_memory_limit=4)
    for i in range(20):
        h.session.publish("t", str(i).encode(), 1 + i % 2)
    h.session.publish("t", b"qos0", 0)  # published while spilled: must not overtake
    h.take()
    assert h.session.queued == 21 and h.session.queued_in_memory == 5
    assert len(h.journal.messages) == 20
    h.connect(session_present=False)
    for _ in range(200):
        refill_from(h)
        h.take()
        for packet_id, o in list(h.session._outbound.inflight.items()):
            if o.qos == 1:
                h.session.receive(PubAck(packet_id))
            elif o.released:
                h.session.receive(PubComp(packet_id))
            else:
                h.session.receive(PubRec(packet_id))
        if h.session.is_idle:
            break
        assert h.session.queued_in_memory <= 4 + 1
    h.take()
    sent = [p.payload for p in h.wire if isinstance(p, Publish)]
    assert sent == [str(i).encode() for i in range(20)] + [b"qos0"]
    assert h.journal.messages == {}


def test_restore_with_a_partial_queue_continues_after_the_last_stored_seq() -> None:
    h = Harness(queue_memory_limit=0)
    for i in range(10):
        h.session.publish("t", str(i).encode(), 1)
    h.take()
    partial = h.journal.copy()
    partial.messages = dict(list(partial.messages.items())[:3])
    partial.queued_not_loaded = 7
    restored = Session(SessionConfig(client_id=CID, queue_memory_limit=3), partial)
    assert restored.queued == 10 and restored.queued_in_memory == 3
    seq = restored.publish("t", b"new", 1)
    assert seq == 11  # above the seqs that were not loaded
    assert restored.want_refill() is None  # memory still holds 3 > 3 // 2
    restored._queue.memory.popleft()
    restored._queue.memory.popleft()
    assert restored.want_refill() == (3, 2)


def test_drop_oldest_when_only_spilled_messages_remain() -> None:
    h = Harness(max_queued=3, queue_full="drop_oldest", queue_memory_limit=1)
    h.session.publish("t", b"0", 1)
    h.session.publish("t", b"1", 1)
    h.session.publish("t", b"2", 1)
    h.take()
    h.session._queue.memory.clear()  # as if the memory part had drained into a window elsewhere
    h.session._queue.spilled = 3
    h.session._queue.spill_after = 0
    h.session.publish("t", b"3", 1)
    assert h.session.queued == 3
    h.take()
    refill_from(h)
    out = h.take()
    assert completed(out) == {1: DeliveryOutcome.DROPPED}
    assert [m.payload for m in h.journal.messages.values()] == [b"1", b"2", b"3"]


def test_an_outbox_never_shares_lists_with_later_output() -> None:
    """Regression: take() once handed out its own (empty) lists, so output produced while the
    shell awaited the commit left with that batch, before its operations were committed."""
    h = Harness(max_inflight=1)
    h.connect(session_present=False)
    h.session.publish("t", b"a", 2)
    (pub,) = publishes(h.take())
    h.session.publish("t", b"b", 2)  # window full: an operation, no packet
    out = h.session.take(h.now)
    assert out.packets == []
    h.session.receive(PubRec(pub.packet_id))  # arrives while the shell commits `out`
    assert out.packets == [] and out.events == []
    assert h.session.take(h.now).packets == [PubRel(pub.packet_id)]


def test_qos2_window_is_narrower_and_nothing_overtakes_a_waiting_qos2_message() -> None:
    h = Harness(max_inflight=10, max_inflight_qos2=2)
    h.connect(session_present=False)
    for i, qos in enumerate([2, 2, 2, 1, 1]):
        h.session.publish("t", str(i).encode(), qos)
    out = h.take()
    # The third QoS 2 message waits for a QoS 2 slot, and the QoS 1 ones wait behind it.
    assert [p.payload for p in publishes(out)] == [b"0", b"1"]
    first = publishes(out)[0]
    h.feed(PubRec(first.packet_id))
    out = h.feed(PubComp(first.packet_id))
    assert [p.payload for p in publishes(out)] == [b"2", b"3", b"4"]
    assert h.session._outbound.qos2_inflight == 2
