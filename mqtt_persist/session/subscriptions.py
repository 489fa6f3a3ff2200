"""Subscription bookkeeping: what the session wants, what is on its way, and who waits for it.

Durable: the filters the session wants (confirmed once a SUBACK granted them) and the filters
removed locally whose UNSUBSCRIBE the broker has not acknowledged. Per connection: which
SUBSCRIBE/UNSUBSCRIBE packet IDs carry which filters, and which SUBSCRIBEs restore a session the
broker lost ("subscriptions come back": the connection is ready only once all of them are
answered). Per process: the ``subscribe()``/``unsubscribe()`` calls waiting for the broker's answer
on each of their filters.

MQTT 5 adds, per filter, subscription options (no local, retain as published, retain handling)
and a subscription identifier, stored with the subscription. A SUBSCRIBE carries at most one
identifier, so filters with different identifiers travel in separate packets. Over MQTT 3.1.1
neither can be sent: the filters are subscribed with their QoS alone, and that is said once.
"""

from __future__ import annotations

from mqtt_persist.errors import ProtocolError
from mqtt_persist.protocol.packets import (
    NO_PROPERTIES,
    SUBACK_FAILURE,
    Properties,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
)
from mqtt_persist.session.events import (
    SUBSCRIPTION_SUPERSEDED,
    Anomaly,
    Notice,
    SubscribeCompleted,
    UnsubscribeCompleted,
)
from mqtt_persist.session.output import PendingOutput
from mqtt_persist.session.packet_ids import PacketIdAllocator
from mqtt_persist.session.state import (
    SessionState,
    StoredSubscription,
    SubscriptionRemoved,
    UnsubscribeDone,
    subscription_set,
)
from mqtt_persist.session.terms import ConnectionTerms

#: Filters per SUBSCRIBE when re-subscribing a large stored set; keeps packets modest.
RESUBSCRIBE_CHUNK = 64


class SubscriptionRequest:
    """A subscribe/unsubscribe call waiting for the broker to answer each of its filters."""

    __slots__ = ("codes", "remaining", "subs", "token", "unsubscribe")

    def __init__(
        self,
        token: int,
        filters: list[str],
        unsubscribe: bool,
        subs: dict[str, StoredSubscription] | None = None,
    ) -> None:
        self.token = token
        #: The broker's answer per filter; -1 until it came.
        self.codes: dict[str, int] = dict.fromkeys(filters, -1)
        self.remaining = len(self.codes)
        self.unsubscribe = unsubscribe
        #: A subscribe: the subscription it asked for, per filter (only a SUBACK for that very
        #: subscription answers it).
        self.subs: dict[str, StoredSubscription] = subs or {}


class Subscriptions:
    """The session's subscriptions, durable and in flight, and the requests waiting on them."""

    __slots__ = (
        "_ids",
        "_next_token",
        "_out",
        "_told_3_1_1",
        "filters_in_flight",
        "pending_unsubscribes",
        "resubscribe_ids",
        "subscribe_packets",
        "terms",
        "unsubscribe_packets",
        "waiters",
        "wanted",
    )

    def __init__(self, ids: PacketIdAllocator, out: PendingOutput) -> None:
        self._ids = ids
        self._out = out
        #: Filters the session wants (durable).
        self.wanted: dict[str, StoredSubscription] = {}
        #: Filters removed locally whose UNSUBSCRIBE the broker has not acknowledged (durable).
        self.pending_unsubscribes: set[str] = set()
        #: Per connection: SUBSCRIBE packet IDs and the subscriptions they carry.
        self.subscribe_packets: dict[int, list[StoredSubscription]] = {}
        #: Per connection: UNSUBSCRIBE packet IDs and the filters they carry.
        self.unsubscribe_packets: dict[int, list[str]] = {}
        #: Per connection: filters some SUBSCRIBE carries that has not been answered yet.
        self.filters_in_flight: set[str] = set()
        #: Per connection: the SUBSCRIBEs restoring a lost session that are not answered yet.
        self.resubscribe_ids: set[int] = set()
        #: Requests waiting for an answer, by filter.
        self.waiters: dict[str, list[SubscriptionRequest]] = {}
        self._next_token = 1
        #: What the current connection allows (the session sets it).
        self.terms = ConnectionTerms()
        self._told_3_1_1 = False

    def restore(self, state: SessionState) -> None:
        """Take the subscriptions of a stored session."""
        self.wanted = dict(state.subscriptions)
        self.pending_unsubscribes = set(state.pending_unsubscribes)

    # --- application requests ------------------------------------------------------------------

    def subscribe(self, subscriptions: list[StoredSubscription], *, send: bool) -> int:
        """Record subscriptions, SUBSCRIBE now if ``send``; returns the request's token."""
        token = self._new_token()
        latest: dict[str, StoredSubscription] = {s.topic_filter: s for s in subscriptions}
        request = SubscriptionRequest(
            token, [s.topic_filter for s in subscriptions], unsubscribe=False, subs=latest
        )
        ops = self._out.ops
        for sub in subscriptions:
            topic_filter = sub.topic_filter
            self.wanted[topic_filter] = sub
            self.pending_unsubscribes.discard(topic_filter)
            ops.append(subscription_set(sub))
        for topic_filter, sub in latest.items():
            # Earlier requests for another subscription of this filter that no SUBSCRIBE on the
            # wire carries will never be answered: this call replaced them.
            self._supersede(topic_filter, keep=(sub, *self._on_the_wire(topic_filter)))
            self.waiters.setdefault(topic_filter, []).append(request)
        if send:
            self._send_subscriptions(list(latest.values()))
        return token

    def unsubscribe(self, filters: list[str], *, send: bool) -> int:
        """Forget filters, UNSUBSCRIBE now if ``send``; returns the request's token."""
        token = self._new_token()
        request = SubscriptionRequest(token, filters, unsubscribe=True)
        ops = self._out.ops
        for topic_filter in dict.fromkeys(filters):
            # A subscribe still waiting for this filter is superseded, not refused: whatever
            # its SUBACK says, the filter is no longer wanted.
            self._supersede(topic_filter, keep=())
            self.wanted.pop(topic_filter, None)
            self.pending_unsubscribes.add(topic_filter)
            ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=True))
            self.waiters.setdefault(topic_filter, []).append(request)
        if send:
            self._send_unsubscribe(list(dict.fromkeys(filters)))
        return token

    def _new_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    # --- connection lifecycle ------------------------------------------------------------------

    def resubscribe_all(self) -> None:
        """The broker lost the session: SUBSCRIBE every wanted filter, in modest packets."""
        self.resubscribe_ids.update(self._send_subscriptions(list(self.wanted.values())))

    def send_missing(self) -> None:
        """The connection is ready: send what the broker may not have yet.

        That is every subscription not confirmed (made offline, or its SUBACK never came) and
        not already on its way, and every pending unsubscribe.
        """
        missing = [
            s for f, s in self.wanted.items() if not s.confirmed and f not in self.filters_in_flight
        ]
        if missing:
            self._send_subscriptions(missing)
        if self.pending_unsubscribes:
            self._send_unsubscribe(sorted(self.pending_unsubscribes))

    def broker_lost_session(self) -> None:
        """A broker without the session holds none of its filters: nothing left to unsubscribe."""
        for topic_filter in sorted(self.pending_unsubscribes):
            self._out.ops.append(UnsubscribeDone(topic_filter))
            self._answer(topic_filter, 0, unsubscribe=True)
        self.pending_unsubscribes.clear()

    def connection_lost(self) -> None:
        """Requests in flight died with the connection; their filters are sent again on ready."""
        for packet_id in (*self.subscribe_packets, *self.unsubscribe_packets):
            self._ids.release(packet_id)
        self.subscribe_packets.clear()
        self.unsubscribe_packets.clear()
        self.filters_in_flight.clear()
        self.resubscribe_ids.clear()
        # Only what is wanted now is sent again: requests for an older subscription of a
        # filter, whose SUBACK died with the connection, were superseded.
        for topic_filter in list(self.waiters):
            current = self.wanted.get(topic_filter)
            self._supersede(topic_filter, keep=() if current is None else (current,))

    def _on_the_wire(self, topic_filter: str) -> list[StoredSubscription]:
        """The subscriptions of this filter that unanswered SUBSCRIBEs carry."""
        return [
            s
            for subs in self.subscribe_packets.values()
            for s in subs
            if s.topic_filter == topic_filter
        ]

    def _supersede(self, topic_filter: str, keep: tuple[StoredSubscription, ...]) -> None:
        """Answer SUPERSEDED to the subscribe requests on this filter not asking for ``keep``."""
        waiting = self.waiters.get(topic_filter)
        if not waiting:
            return
        for request in waiting:
            if request.unsubscribe or request.codes[topic_filter] != -1:
                continue
            if not any(_same(request.subs[topic_filter], k) for k in keep):
                self._complete_one(request, topic_filter, SUBSCRIPTION_SUPERSEDED)
        self._prune(topic_filter)

    # --- packets ---------------------------------------------------------------------------------

    def _send_subscriptions(self, subs: list[StoredSubscription]) -> list[int]:
        """SUBSCRIBE ``subs``: one packet per subscription identifier, in modest packets."""
        v5 = self.terms.v5
        groups: dict[int | None, list[StoredSubscription]] = {}
        for sub in subs:
            groups.setdefault(sub.subscription_id if v5 else None, []).append(sub)
        if not v5 and not self._told_3_1_1 and any(s.options or s.subscription_id for s in subs):
            self._told_3_1_1 = True
            self._out.events.append(
                Notice(
                    "this connection speaks MQTT 3.1.1: subscription options and identifiers "
                    "are not sent, the filters are subscribed with their QoS alone"
                )
            )
        packet_ids = []
        for subscription_id, group in groups.items():
            for start in range(0, len(group), RESUBSCRIBE_CHUNK):
                chunk = group[start : start + RESUBSCRIBE_CHUNK]
                packet_ids.append(self._send_subscribe(chunk, subscription_id))
        return packet_ids

    def _send_subscribe(self, subs: list[StoredSubscription], subscription_id: int | None) -> int:
        packet_id = self._ids.allocate()
        self.subscribe_packets[packet_id] = subs
        self.filters_in_flight.update(s.topic_filter for s in subs)
        properties = NO_PROPERTIES
        if subscription_id is not None and self.terms.subscription_identifiers:
            properties = Properties(subscription_identifiers=(subscription_id,))
        v5 = self.terms.v5
        self._out.packets.append(
            Subscribe(
                packet_id,
                [(s.topic_filter, _options(s) if v5 and s.options else s.qos) for s in subs],
                properties,
            )
        )
        return packet_id

    def _send_unsubscribe(self, filters: list[str]) -> None:
        packet_id = self._ids.allocate()
        self.unsubscribe_packets[packet_id] = filters
        self._out.packets.append(Unsubscribe(packet_id, filters))

    def on_suback(self, suback: SubAck) -> bool:
        """Record the broker's grants; True when it answered the last re-subscription."""
        pairs = self.subscribe_packets.pop(suback.packet_id, None)
        if pairs is None:
            self._out.events.append(
                Anomaly(
                    f"the broker sent SUBACK for packet ID {suback.packet_id}, which no "
                    "SUBSCRIBE on this connection carries (a late duplicate, or a broker bug); "
                    "ignored"
                )
            )
            return False
        self._ids.release(suback.packet_id)
        if len(suback.return_codes) != len(pairs):
            raise ProtocolError(
                f"SUBACK carries {len(suback.return_codes)} return codes for {len(pairs)} filters"
            )
        ops = self._out.ops
        for sent, code in zip(pairs, suback.return_codes, strict=True):
            topic_filter = sent.topic_filter
            self.filters_in_flight.discard(topic_filter)
            current = self.wanted.get(topic_filter)
            if current is not None and _same(current, sent):
                if code >= SUBACK_FAILURE:
                    del self.wanted[topic_filter]
                    ops.append(SubscriptionRemoved(topic_filter, unsubscribe_pending=False))
                elif not current.confirmed:
                    confirmed = subscription_set(current, confirmed=True)
                    self.wanted[topic_filter] = StoredSubscription(
                        topic_filter,
                        current.qos,
                        True,
                        current.options,
                        current.subscription_id,
                    )
                    ops.append(confirmed)
            self._answer(topic_filter, code, unsubscribe=False, sent=sent)
        if suback.packet_id in self.resubscribe_ids:
            self.resubscribe_ids.discard(suback.packet_id)
            return not self.resubscribe_ids
        return False

    def on_unsuback(self, packet: UnsubAck) -> None:
        """The broker dropped the filters of one UNSUBSCRIBE."""
        packet_id = packet.packet_id
        filters = self.unsubscribe_packets.pop(packet_id, None)
        if filters is None:
            self._out.events.append(
                Anomaly(
                    f"the broker sent UNSUBACK for packet ID {packet_id}, which no UNSUBSCRIBE "
                    "on this connection carries (a late duplicate, or a broker bug); ignored"
                )
            )
            return
        self._ids.release(packet_id)
        for topic_filter in filters:
            if topic_filter in self.pending_unsubscribes:
                self.pending_unsubscribes.discard(topic_filter)
                self._out.ops.append(UnsubscribeDone(topic_filter))
            self._answer(topic_filter, 0, unsubscribe=True)

    def _answer(
        self,
        topic_filter: str,
        code: int,
        *,
        unsubscribe: bool,
        sent: StoredSubscription | None = None,
    ) -> None:
        """Record the broker's answer for every waiting request of this kind on this filter
        (a SUBACK: only those that asked for the subscription ``sent``)."""
        waiting = self.waiters.get(topic_filter)
        if not waiting:
            return
        for request in waiting:
            if request.unsubscribe is not unsubscribe:
                continue
            if request.codes[topic_filter] != -1:
                continue  # already answered by an earlier packet naming the same filter
            if sent is not None and not _same(request.subs[topic_filter], sent):
                continue  # it asked for another subscription of this filter
            self._complete_one(request, topic_filter, code)
        self._prune(topic_filter)

    def _complete_one(self, request: SubscriptionRequest, topic_filter: str, code: int) -> None:
        request.codes[topic_filter] = code
        request.remaining -= 1
        if request.remaining == 0:
            if request.unsubscribe:
                self._out.events.append(UnsubscribeCompleted(request.token))
            else:
                self._out.events.append(
                    SubscribeCompleted(request.token, tuple(request.codes.values()))
                )

    def _prune(self, topic_filter: str) -> None:
        """Forget the requests on this filter that got their answer for it."""
        keep = [r for r in self.waiters[topic_filter] if r.codes[topic_filter] == -1]
        if keep:
            self.waiters[topic_filter] = keep
        else:
            del self.waiters[topic_filter]


def _same(a: StoredSubscription, b: StoredSubscription) -> bool:
    """The same subscription, whether confirmed or not."""
    return (a.qos, a.options, a.subscription_id) == (b.qos, b.options, b.subscription_id)


def _options(sub: StoredSubscription) -> SubscriptionOptions:
    """The SUBSCRIBE options of a stored subscription (QoS plus its MQTT 5 option bits)."""
    return SubscriptionOptions.from_byte(sub.qos | sub.options)
