"""Metrics hooks: what a client tells a monitoring library, and the adapters that export it.

The client never imports a metrics library. It calls a :class:`MetricsSink`, given as
``PersistentClient(..., metrics=sink)``, at three points: each store commit (its latency and
how many operations it carried), each message ``publish()`` accepted, each message received.
Everything else (queue depth, connections, drops, in-doubt messages...) is in
:attr:`PersistentClient.stats <mqtt_persist.PersistentClient.stats>`, which an exporter reads
when it is scraped, through the :class:`StatsSource` the client hands it; nothing on the hot
path. Without a sink (the default) the hooks cost one ``is not None`` test each.

Adapters: :mod:`mqtt_persist.metrics.prometheus` (``pip install 'mqtt-persist[prometheus]'``).
The metric names are documented in docs/metrics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mqtt_persist.client.persistent_client import ClientStats

__all__ = ["ClientMetrics", "MetricsSink", "StatsSource"]


class StatsSource(Protocol):
    """What an exporter reads when it is scraped: a :class:`~mqtt_persist.PersistentClient`."""

    @property
    def stats(self) -> ClientStats:
        """The client's counters and queue depth now."""
        ...

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up (subscriptions restored)."""
        ...


class ClientMetrics(Protocol):
    """One client's recorder, returned by :meth:`MetricsSink.bind`; its methods must be cheap
    and must not raise (they run inside the client's flusher and ``publish()``)."""

    def commit(self, seconds: float, operations: int) -> None:
        """One ``store.apply`` finished: how long it took and how many operations it carried
        (group commit: every publish that arrived while the previous commit ran)."""
        ...

    def published(self, qos: int) -> None:
        """``publish()`` accepted a message (for QoS 1/2: it is in the store)."""
        ...

    def received(self, qos: int) -> None:
        """A message from the broker was handed to the application (after its commit)."""
        ...


class MetricsSink(Protocol):
    """Where clients report; one sink may serve many clients (each binds with its id)."""

    def bind(self, client_id: str, source: StatsSource) -> ClientMetrics:
        """Called once by each client on creation: the recorder it reports to, labelled with
        ``client_id``; ``source`` is the client, whose stats are read at scrape time (hold it
        weakly: a client that is gone should not be kept alive by its metrics)."""
        ...
