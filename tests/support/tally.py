"""Numbered message streams and what an outside observer made of them.

Every fault scenario publishes message ``i`` with the payload ``str(i)``: even numbers at QoS 1
on ``PREFIX/q1``, odd numbers at QoS 2 on ``PREFIX/q2``. The scenario records which numbers
``publish()`` accepted; an independent paho subscriber records what arrived. :func:`tally`
compares the two into :class:`FaultFigures`, the row the fault matrix prints.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.support.wire import PUBLISH, WirePacket

__all__ = ["FaultFigures", "qos_of", "tally", "topic_of", "wire_order_violations"]


def topic_of(prefix: str, i: int) -> str:
    """Message ``i``'s topic: QoS 1 messages (even) and QoS 2 messages (odd) apart."""
    return f"{prefix}/q1" if i % 2 == 0 else f"{prefix}/q2"


def qos_of(i: int) -> int:
    return 1 if i % 2 == 0 else 2


@dataclass
class FaultFigures:
    """What one fault scenario observed. Lists hold message numbers."""

    fault: str
    store: str
    #: Messages ``publish()`` returned for (accepted: stored, the library's responsibility).
    accepted: int = 0
    #: Accepted messages that reached the outside subscriber (each counted once).
    arrived: int = 0
    lost: list[int] = field(default_factory=list)
    #: QoS 2 messages that reached the subscriber more than once.
    qos2_duplicates: list[int] = field(default_factory=list)
    #: QoS 1 messages that arrived more than once (allowed: at least once).
    qos1_repeats: int = 0
    #: Deliveries that ended IN_DOUBT (the broker lost its session after PUBREC).
    in_doubt: int = 0
    #: Messages the client published again as new because the broker lost its session.
    requeued: int = 0
    #: How many times the fault was injected (cuts, kills, restarts, ...).
    faults: int = 0
    seconds: float = 0.0
    #: Anything else the scenario measured, by name.
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.qos2_duplicates


def tally(
    figures: FaultFigures,
    accepted: Iterable[int],
    arrived_payloads: Iterable[tuple[str, bytes]],
    *,
    excused: Iterable[int] = (),
) -> FaultFigures:
    """Fill ``figures`` from the accepted numbers and the observer's (topic, payload) pairs.

    ``excused`` numbers are left out of the QoS 2 duplicate count (a test that publishes a
    message twice itself, e.g. after killing a publisher mid-``publish()``).
    """
    accepted_set = set(accepted)
    counts: Counter[int] = Counter()
    q2: Counter[int] = Counter()
    for topic, payload in arrived_payloads:
        try:
            i = int(payload)
        except ValueError:
            continue
        counts[i] += 1
        if topic.endswith("/q2"):
            q2[i] += 1
    excused_set = set(excused)
    figures.accepted = len(accepted_set)
    figures.arrived = len(accepted_set & counts.keys())
    figures.lost = sorted(accepted_set - counts.keys())
    figures.qos2_duplicates = sorted(i for i, n in q2.items() if n > 1 and i not in excused_set)
    figures.qos1_repeats = sum(n - 1 for i, n in counts.items() if i % 2 == 0 and n > 1)
    return figures


def wire_order_violations(
    packets: Iterable[WirePacket], direction: str = "up", *, may_repeat: Iterable[int] = ()
) -> list[str]:
    """PUBLISH packets that broke per-connection order on the wire.

    Within one connection the numbered messages of one topic must go out in increasing order,
    each once: the resends of a reconnect first, then the rest. (A subscriber's view is not
    used: mosquitto itself may reorder deliveries after reconnects.) Numbers in ``may_repeat``
    may follow themselves (a test that publishes a message again as a new one).
    """
    repeatable = set(may_repeat)
    sent: dict[tuple[int, str], list[int]] = {}
    for p in packets:
        if p.type == PUBLISH and p.direction == direction and p.topic and p.payload is not None:
            try:
                sent.setdefault((p.link, p.topic), []).append(int(p.payload))
            except ValueError:
                continue
    problems = []
    for (link, topic), numbers in sorted(sent.items()):
        for a, b in itertools.pairwise(numbers):
            if b < a or (b == a and a not in repeatable):
                problems.append(f"connection {link} {topic}: {b} after {a}")
    return problems
