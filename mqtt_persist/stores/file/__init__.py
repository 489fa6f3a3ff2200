"""FileStore: one append-only journal file per session.

``store`` is the store's facade (the public methods), built from ``core`` (configuration,
worker plumbing, opening and removing sessions), ``loading`` (the read jobs), ``appends`` (the
write path: append or compact) and ``expiry`` (listing, TTL, cleanup); ``session`` one open
journal; ``writer`` the write path (appends on the
event loop, syncs on the syncer thread); ``journal`` the file format and how a journal is read;
``index`` the in-memory index of an open session and what each operation does to it;
``readback`` reading messages back; ``snapshot`` rewriting a journal; ``sizes`` the tunable
sizes.
"""

from mqtt_persist.stores.file.journal import FORMAT_VERSION, MAGIC
from mqtt_persist.stores.file.store import FileStore

__all__ = ["FORMAT_VERSION", "MAGIC", "FileStore"]

# Its public home: what repr(), pickling and the test helpers that import it by name see.
FileStore.__module__ = __name__
