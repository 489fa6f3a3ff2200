"""Metrics: a real client against mosquitto, scraped through prometheus_client, read back."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from mqtt_persist import Backoff, FileStore, PersistentClient
from mqtt_persist.metrics.prometheus import PrometheusMetrics
from tests.support.broker import MosquittoBroker
from tests.support.waiting import until

FAST = Backoff(initial=0.05, maximum=0.2, minimum=0.01)

pytestmark = pytest.mark.broker

#: Counters read from client.stats: exported name -> ClientStats field.
STATS_COUNTERS = {
    "mqtt_persist_connections_total": "connections",
    "mqtt_persist_dropped_messages_total": "dropped",
    "mqtt_persist_in_doubt_messages_total": "in_doubt",
    "mqtt_persist_requeued_messages_total": "requeued",
    "mqtt_persist_duplicates_suppressed_total": "duplicates_suppressed",
    "mqtt_persist_expired_messages_total": "expired",
    "mqtt_persist_refused_messages_total": "refused",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    """Every sample of a text exposition, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_the_exported_metrics_are_what_happened(
    persistent_broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker, n = persistent_broker, 25
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    async with PersistentClient(
        broker.host,
        broker.port,
        client_id="metered",
        store=FileStore(tmp_path / "sessions"),
        metrics=metrics,
        backoff=FAST,
    ) as client:
        await client.wait_connected(timeout=10)
        await (await client.subscribe("metered/#", qos=1))
        for i in range(n):  # the subscription brings each one back
            await client.publish("metered/t", b"%d" % i, qos=1)
        await client.publish("elsewhere", b"q0", qos=0)
        await client.drain(timeout=20)
        received = 0
        with anyio.fail_after(20):
            async for message in client.messages:
                assert message.qos == 1
                received += 1
                if received == n:
                    break

        broker.restart()  # SIGTERM: the broker keeps the session; the client reconnects once
        await until(lambda: client.stats.connections == 2, 30, "the reconnect")
        await client.wait_connected(timeout=10)
        stats = client.stats
        samples = parse(generate_latest(registry).decode())

        labels = {"client_id": "metered"}
        assert value(samples, "mqtt_persist_messages_published_total", **labels, qos="1") == n
        assert value(samples, "mqtt_persist_messages_published_total", **labels, qos="0") == 1
        assert value(samples, "mqtt_persist_messages_received_total", **labels, qos="1") == n
        commits = value(samples, "mqtt_persist_store_commit_seconds_count", **labels)
        assert commits > 0
        assert value(samples, "mqtt_persist_store_commit_seconds_sum", **labels) > 0
        assert value(samples, "mqtt_persist_store_commit_operations_count", **labels) == commits
        # Each QoS 1 message costs at least its MessageAdded and MessageRemoved operations.
        assert value(samples, "mqtt_persist_store_commit_operations_sum", **labels) >= 2 * n
        assert value(samples, "mqtt_persist_reconnects_total", **labels) == 1
        assert value(samples, "mqtt_persist_connected", **labels) == 1
        assert value(samples, "mqtt_persist_queue_depth", **labels, state="queued") == 0
        assert value(samples, "mqtt_persist_queue_depth", **labels, state="inflight") == 0
        for name, field in STATS_COUNTERS.items():
            assert value(samples, name, **labels) == getattr(stats, field), name
        assert stats.connections == 2

        # The same through an HTTP endpoint, as Prometheus scrapes it.
        server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            body = await anyio.to_thread.run_sync(
                lambda: urllib.request.urlopen(url, timeout=10).read()
            )
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        over_http = parse(body.decode())
        assert value(over_http, "mqtt_persist_messages_published_total", **labels, qos="1") == n
        assert value(over_http, "mqtt_persist_reconnects_total", **labels) == 1


async def test_queue_depth_follows_the_queue_while_offline(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    async with PersistentClient(
        "127.0.0.1",
        9,  # nothing there: the messages wait in the queue
        client_id="offline-metered",
        store=FileStore(tmp_path / "sessions"),
        metrics=metrics,
        exit_timeout=0,
    ) as client:
        for i in range(7):
            await client.publish("t", b"%d" % i, qos=2)
        samples = parse(generate_latest(registry).decode())
    labels = {"client_id": "offline-metered"}
    assert value(samples, "mqtt_persist_queue_depth", **labels, state="queued") == 7
    assert value(samples, "mqtt_persist_connected", **labels) == 0
    assert value(samples, "mqtt_persist_connections_total", **labels) == 0
    assert value(samples, "mqtt_persist_reconnects_total", **labels) == 0
    assert value(samples, "mqtt_persist_messages_published_total", **labels, qos="2") == 7


def test_the_library_never_imports_prometheus_client() -> None:
    probe = (
        "import sys, mqtt_persist, mqtt_persist.metrics, mqtt_persist.client; "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
