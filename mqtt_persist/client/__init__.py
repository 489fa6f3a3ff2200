"""The I/O shell: :class:`PersistentClient` and the parts it runs (see persistent_client.py)."""

from mqtt_persist.client.options import ClientOptions
from mqtt_persist.client.persistent_client import ClientStats, PersistentClient

__all__ = ["ClientOptions", "ClientStats", "PersistentClient"]
