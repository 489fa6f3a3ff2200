"""How every store names what it moves aside: one UTC time stamp format.

Damaged data is never deleted: FileStore and SQLiteStore rename files to
``<name>.corrupt-<stamp>``, SQLiteStore records the stamp with quarantined rows, RedisStore
RENAMEs keys to ``<prefix>:quarantine:<stamp>:<client id>:<name>``. The stamp sorts in time
order as text and says when, to the microsecond, in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["quarantine_stamp"]


def quarantine_stamp() -> str:
    """The current UTC time as ``YYYYmmddTHHMMSS.ffffffZ``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
