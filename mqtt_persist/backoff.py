"""Reconnect delays: exponential backoff with full jitter, and a cap on reconnects per minute.

Full jitter (a uniform draw between zero and the exponential cap) spreads a fleet of devices that
lost the same broker at the same moment, so they do not all come back in one thundering herd.

A CONNACK alone does not start the delays again from ``initial``: a broker that accepts the
connection and closes it at once (nats-server does, on a PUBLISH it will not take) would
otherwise be reconnected to without pause. Only a connection that stayed up ``reset_after``
seconds and on which the broker sent something after CONNACK (an acknowledgement, a message, a
PINGRESP) resets them. Whatever the delays, at most ``max_per_minute`` connections that got
nowhere are opened to the broker in any 60 seconds: connections that ended without the broker
sending anything after CONNACK. An attempt whose TCP connect fails is paced by the delays alone
(it costs the broker nothing, and a broker that is down for a minute must not cost a minute
more), and so is a connection that carried traffic before it was cut (a flaky network is not
a broker refusing us).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): uniform(minimum, min(maximum, base·2ⁿ)).

    ``n`` counts reconnects since the last connection that stayed up ``reset_after`` seconds and
    heard from the broker; ``max_per_minute`` caps the connections opened per 60 s whatever the
    delays say.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    #: A floor, so that even an unlucky draw does not spin on a broker that refuses at once.
    minimum: float = 0.05
    #: Seconds a connection must stay up, with the broker sending something after CONNACK,
    #: before the next reconnect starts from ``initial`` again.
    reset_after: float = 10.0
    #: Connections opened to the broker (TCP/TLS established) in any 60 seconds (0: no cap).
    max_per_minute: int = 30
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 <= minimum <= initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("Backoff multiplier must be at least 1")
        if self.reset_after < 0:
            raise ValueError("Backoff reset_after must not be negative")
        if not isinstance(self.max_per_minute, int) or self.max_per_minute < 0:
            raise ValueError("Backoff max_per_minute must be an int >= 0 (0: no cap)")

    def cap(self, attempt: int) -> float:
        """The upper bound of the draw for this attempt."""
        # Bound the exponent so a long outage cannot overflow the float.
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """A jittered delay for this attempt."""
        return self.rng.uniform(self.minimum, max(self.minimum, self.cap(attempt)))


class AttemptBudget:
    """``Backoff.max_per_minute``: when the next connection attempt may start, given when the
    last connections opened. No I/O."""

    __slots__ = ("_limit", "_starts")

    WINDOW = 60.0

    def __init__(self, max_per_minute: int) -> None:
        self._limit = max_per_minute
        self._starts: deque[float] = deque()

    def wait(self, now: float) -> float:
        """Seconds to wait before an attempt may start at ``now`` (0: at once)."""
        starts = self._starts
        while starts and now - starts[0] >= self.WINDOW:
            starts.popleft()
        if not self._limit or len(starts) < self._limit:
            return 0.0
        return starts[len(starts) - self._limit] + self.WINDOW - now

    def started(self, now: float) -> None:
        """A connection opened at ``now``."""
        if self._limit:
            self._starts.append(now)
