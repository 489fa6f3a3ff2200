"""RedisStore: sessions in Redis, for several gateway processes sharing one set of sessions.

Needs redis-py, an optional extra (``pip install mqtt-persist[redis]``): importing this package
without it raises :class:`RedisUnavailable`, and ``mqtt_persist.stores`` imports it only when
``RedisStore`` is first asked for. ``store`` is the store's facade (the public methods), on
``core`` (configuration, connection, scripts, the fenced session call, quarantine); ``keys``
the key layout; ``codec``
what each operation becomes and how a reply becomes a state; ``scripts`` and ``scripts/*.lua``
the Lua scripts; ``lease`` the leases and their fencing tokens (``stores._owners``: who holds one).
"""

from mqtt_persist.errors import StoreError


class RedisUnavailable(StoreError, ImportError):
    """redis-py is not installed; ``pip install mqtt-persist[redis]`` brings it."""


try:
    import redis.asyncio  # noqa: F401  (only whether it imports)
except ImportError as exc:  # the extra is optional: say how to get it, in both error families
    raise RedisUnavailable("RedisStore needs redis-py: pip install mqtt-persist[redis]") from exc

from mqtt_persist.stores.redis.server import FORMAT_VERSION  # noqa: E402
from mqtt_persist.stores.redis.store import RedisStore  # noqa: E402

__all__ = ["FORMAT_VERSION", "RedisStore", "RedisUnavailable"]

# Its public home: what repr(), pickling and the test helpers that import it by name see.
RedisStore.__module__ = __name__
