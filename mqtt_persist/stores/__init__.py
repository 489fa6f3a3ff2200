"""Session stores: where a client's session lives between runs.

:class:`SessionStore` is the contract; :class:`MemoryStore` keeps sessions for the life of the
process, :class:`FileStore` in crash-safe journal files.
"""

from mqtt_persist.stores.base import SessionInfo, SessionStore
from mqtt_persist.stores.file import FileStore
from mqtt_persist.stores.memory import MemoryStore

__all__ = ["FileStore", "MemoryStore", "SessionInfo", "SessionStore"]
