"""Expiry and :class:`SessionInfo`, with one meaning for every store.

A session's expiry is a TTL counted from its last access. At the Python level "never" is
``None`` in every store; a medium that cannot hold NULL (Redis hashes, FileStore's record
bodies) writes 0 and converts at its edge with :func:`ttl_from`.
"""

from __future__ import annotations

import math

from mqtt_persist.errors import InvalidInput
from mqtt_persist.stores.base import SessionInfo

__all__ = ["expires_at", "is_expired", "session_info", "ttl_from"]


def ttl_from(seconds: object) -> float | None:
    """A TTL as the stores keep it: seconds > 0, or None for never (None or 0 given).

    Raises :class:`~mqtt_persist.errors.InvalidInput` for anything else (negative, infinite,
    NaN, not a number).
    """
    if seconds is None or seconds == 0:
        return None
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"a session TTL must be None or seconds >= 0, not {seconds!r}")
    return float(seconds)


def expires_at(last_access: float, ttl: float | None) -> float | None:
    """When a session with this last access and TTL expires; None: never."""
    return None if ttl is None else last_access + ttl


def is_expired(last_access: float, ttl: float | None, now: float) -> bool:
    """True once ``now`` reached the expiry (a session expires at that very instant)."""
    return ttl is not None and now >= last_access + ttl


def session_info(
    client_id: str,
    *,
    created_at: float,
    last_access: float,
    ttl: float | None,
    inflight: int,
    queued: int,
    set_aside: int,
) -> SessionInfo:
    """The :class:`SessionInfo` of a stored session (``ttl`` None: never expires)."""
    return SessionInfo(
        client_id=client_id,
        created_at=created_at,
        last_access=last_access,
        expires_at=expires_at(last_access, ttl),
        inflight=inflight,
        queued=queued,
        set_aside=set_aside,
    )
