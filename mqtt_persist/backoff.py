"""Reconnect delays: exponential backoff with full jitter.

Full jitter (a uniform draw between zero and the exponential cap) spreads a fleet of devices that
lost the same broker at the same moment, so they do not all come back in one thundering herd.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): uniform(minimum, min(maximum, base·2ⁿ))."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    #: A floor, so that even an unlucky draw does not spin on a broker that refuses at once.
    minimum: float = 0.05
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 <= minimum <= initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("Backoff multiplier must be at least 1")

    def cap(self, attempt: int) -> float:
        """The upper bound of the draw for this attempt."""
        # Bound the exponent so a long outage cannot overflow the float.
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """A jittered delay for this attempt."""
        return self.rng.uniform(self.minimum, max(self.minimum, self.cap(attempt)))
