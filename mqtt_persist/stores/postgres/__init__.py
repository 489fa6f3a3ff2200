"""PostgresStore: every session in one PostgreSQL schema, one row per message, fenced leases.

``store`` is the store; ``schema`` the tables, the fencing check, format version and
migrations; ``rows`` reading and checking rows; ``operations`` what each journal operation does
to the tables; ``lease`` ownership with fencing tokens; ``connection`` the pool and safe DSNs.
Needs psycopg 3: ``pip install mqtt-persist[postgres]``.
"""

from mqtt_persist.stores.postgres.schema import FORMAT_VERSION
from mqtt_persist.stores.postgres.store import PostgresStore

__all__ = ["FORMAT_VERSION", "PostgresStore"]

# Its public home: what repr(), pickling and the test helpers that import it by name see.
PostgresStore.__module__ = __name__
