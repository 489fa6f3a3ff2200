"""SQLiteStore: every session in one SQLite database, one row per message.

``store`` is the store's facade (the public methods), built from ``core`` (configuration,
worker plumbing, the connection, quarantine), ``reads`` (load, paging through the queue,
listing), ``writes`` (save, applies gathered into one transaction) and ``expiry`` (delete, TTL,
cleanup); ``schema`` the tables, format version and migrations; ``rows`` reading
and checking rows; ``operations`` what each journal operation does to the tables.
"""

from mqtt_persist.stores.sqlite.schema import APPLICATION_ID, FORMAT_VERSION
from mqtt_persist.stores.sqlite.store import SQLiteStore, Synchronous

__all__ = ["APPLICATION_ID", "FORMAT_VERSION", "SQLiteStore", "Synchronous"]

# Its public home: what repr(), pickling and the test helpers that import it by name see.
SQLiteStore.__module__ = __name__
