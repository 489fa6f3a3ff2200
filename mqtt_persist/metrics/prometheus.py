"""Export a client's metrics to Prometheus, through ``prometheus_client``.

::

    from prometheus_client import start_http_server
    from mqtt_persist.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()            # registers in prometheus_client's default registry
    start_http_server(9108, addr="127.0.0.1")
    async with PersistentClient(..., client_id="gw-1", metrics=metrics) as client:
        ...

Every metric is labelled ``client_id``; docs/metrics.md lists them. One
:class:`PrometheusMetrics` per registry serves any number of clients (a second one on the same
registry would register the same names twice, which ``prometheus_client`` refuses). Needs the
``prometheus`` extra: ``pip install 'mqtt-persist[prometheus]'``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mqtt_persist.metrics import ClientMetrics, StatsSource

__all__ = ["BATCH_BUCKETS", "COMMIT_BUCKETS", "PrometheusMetrics"]

#: Store commit latency buckets, seconds: from a MemoryStore's microseconds through a FileStore
#: fsync (~0.1-10 ms) to a slow network store.
COMMIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
#: Operations per commit: 1 for a lone sequential publisher, hundreds under concurrent load.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

#: (name without the namespace, help, ClientStats field) of the counters read from stats.
_STATS_COUNTERS = (
    ("connections", "Successful connections to the broker, the first one included.", None),
    ("reconnects", "Successful connections after the first one.", None),
    ("dropped_messages", "Messages dropped from a full queue (queue_full=drop_oldest).", "dropped"),
    (
        "in_doubt_messages",
        "QoS 2 messages past PUBREC when the broker lost its session.",
        "in_doubt",
    ),
    (
        "requeued_messages",
        "Messages published again as new because the broker lost its session.",
        "requeued",
    ),
    (
        "duplicates_suppressed",
        "Inbound QoS 2 re-sends acknowledged but not delivered again.",
        "duplicates_suppressed",
    ),
    (
        "expired_messages",
        "Messages whose MQTT 5 expiry passed before the broker took them.",
        "expired",
    ),
    ("refused_messages", "Messages the broker refused or announced it cannot take.", "refused"),
)


class PrometheusMetrics:
    """A :class:`~mqtt_persist.metrics.MetricsSink` that registers Prometheus collectors.

    Args:
        registry: where to register (default: ``prometheus_client.REGISTRY``, which
            ``start_http_server`` and ``generate_latest`` serve).
        namespace: the metric name prefix.
        commit_buckets, batch_buckets: histogram buckets of the commit latency (seconds) and of
            the operations per commit.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        namespace: str = "mqtt_persist",
        commit_buckets: Sequence[float] = COMMIT_BUCKETS,
        batch_buckets: Sequence[float] = BATCH_BUCKETS,
    ) -> None:
        self._namespace = namespace
        labels = ["client_id"]
        self._published = Counter(
            "messages_published",
            "Messages publish() accepted (QoS 1/2: stored).",
            [*labels, "qos"],
            namespace=namespace,
            registry=registry,
        )
        self._received = Counter(
            "messages_received",
            "Messages received from the broker and handed to the application.",
            [*labels, "qos"],
            namespace=namespace,
            registry=registry,
        )
        self._commit_seconds = Histogram(
            "store_commit_seconds",
            "Latency of one store commit (store.apply), seconds.",
            labels,
            namespace=namespace,
            registry=registry,
            buckets=commit_buckets,
        )
        self._commit_operations = Histogram(
            "store_commit_operations",
            "Store operations per commit: the group-commit batch size.",
            labels,
            namespace=namespace,
            registry=registry,
            buckets=batch_buckets,
        )
        self._sources: dict[str, weakref.ref[StatsSource]] = {}
        registry.register(_StatsCollector(self))

    def bind(self, client_id: str, source: StatsSource) -> ClientMetrics:
        """The recorder of client ``client_id`` (a later client with the same id takes over
        its series: a restarted process continues them)."""
        self._sources[client_id] = weakref.ref(source)
        return _ClientRecorder(self, client_id)

    def _live_sources(self) -> Iterator[tuple[str, StatsSource]]:
        for client_id, ref in list(self._sources.items()):
            source = ref()
            if source is None:
                del self._sources[client_id]
            else:
                yield client_id, source


class _ClientRecorder:
    """One client's label values bound once, so each hook is one ``observe``/``inc``."""

    __slots__ = ("_commit_operations", "_commit_seconds", "_published", "_received")

    def __init__(self, metrics: PrometheusMetrics, client_id: str) -> None:
        self._commit_seconds = metrics._commit_seconds.labels(client_id)
        self._commit_operations = metrics._commit_operations.labels(client_id)
        self._published = [metrics._published.labels(client_id, str(q)) for q in (0, 1, 2)]
        self._received = [metrics._received.labels(client_id, str(q)) for q in (0, 1, 2)]

    def commit(self, seconds: float, operations: int) -> None:
        self._commit_seconds.observe(seconds)
        self._commit_operations.observe(operations)

    def published(self, qos: int) -> None:
        self._published[qos].inc()

    def received(self, qos: int) -> None:
        self._received[qos].inc()


class _StatsCollector(Collector):
    """Reads each bound client's ``stats`` when scraped: queue depth, connection, counters."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        prefix = self._metrics._namespace + "_"
        depth = GaugeMetricFamily(
            prefix + "queue_depth",
            "Messages waiting for the in-flight window (state=queued) and sent but not yet "
            "acknowledged (state=inflight).",
            labels=["client_id", "state"],
        )
        connected = GaugeMetricFamily(
            prefix + "connected",
            "1 while the connection is up and the session restored on the broker, else 0.",
            labels=["client_id"],
        )
        counters = {
            name: CounterMetricFamily(prefix + name, text, labels=["client_id"])
            for name, text, _ in _STATS_COUNTERS
        }
        for client_id, source in self._metrics._live_sources():
            stats = source.stats
            depth.add_metric([client_id, "queued"], stats.queued)
            depth.add_metric([client_id, "inflight"], stats.inflight)
            connected.add_metric([client_id], 1.0 if source.is_connected else 0.0)
            for name, _, field in _STATS_COUNTERS:
                if field is not None:
                    value = getattr(stats, field)
                elif name == "connections":
                    value = stats.connections
                else:  # reconnects
                    value = max(0, stats.connections - 1)
                counters[name].add_metric([client_id], value)
        yield depth
        yield connected
        yield from counters.values()
