"""PostgresStore: every session in one PostgreSQL schema, one row per message, fenced leases.

``store`` is the store's facade (the public methods), on ``core`` (configuration,
connections, the fenced write, quarantine, shared reads); ``schema`` the tables, the fencing
check, format version and migrations; ``rows`` reading and checking rows; ``operations`` what
each journal operation does to the tables; ``group`` group commit across sessions; ``lease``
ownership with fencing tokens; ``connection`` the pool and safe DSNs.
Needs psycopg 3, an optional extra (``pip install mqtt-persist[postgres]``): importing this
package without it raises :class:`PostgresUnavailable`, and ``mqtt_persist.stores`` imports it
only when ``PostgresStore`` is first asked for.
"""

from mqtt_persist.errors import StoreError


class PostgresUnavailable(StoreError, ImportError):
    """psycopg is not installed; ``pip install mqtt-persist[postgres]`` brings it."""


try:
    import psycopg  # noqa: F401  (only whether it imports)
except ImportError as exc:  # the extra is optional: say how to get it, in both error families
    raise PostgresUnavailable(
        "PostgresStore needs psycopg 3: pip install mqtt-persist[postgres]"
    ) from exc

from mqtt_persist.stores.postgres.schema import FORMAT_VERSION  # noqa: E402
from mqtt_persist.stores.postgres.store import PostgresStore  # noqa: E402

__all__ = ["FORMAT_VERSION", "PostgresStore", "PostgresUnavailable"]

# Its public home: what repr(), pickling and the test helpers that import it by name see.
PostgresStore.__module__ = __name__
