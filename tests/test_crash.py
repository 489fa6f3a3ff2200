"""SIGKILL at random points, over and over, on every durable store.

A child process publishes 500 QoS 1 and 500 QoS 2 messages, printing each one ``publish()``
returned for; it is killed with SIGKILL at random moments after it accepted its first message
(20 cycles) and restarted on the same store, over MQTT 3.1.1 and over MQTT 5, over TCP (and,
with FileStore, over WebSockets). An independent paho
subscriber counts: nothing reported as accepted may be lost and no QoS 2 message may arrive twice;
an MQTT proxy between the children and the broker checks that each connection carried each
topic's messages in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mqtt_persist.protocol.packets import ProtocolVersion
from tests.support.broker import MosquittoBroker
from tests.support.crash import run_kill_cycles

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CYCLES = 20


def store_spec(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        return f"file:{tmp_path / 'sessions'}"
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'sessions.db'}"
    if kind == "redis":
        from tests.support.redis_server import shared_redis_url

        return f"redis:{shared_redis_url()}#crash-{tmp_path.name}"
    if kind == "postgres":
        from tests.support.postgres import shared_postgres_dsn, unique_schema

        return f"postgres:{shared_postgres_dsn()}#{unique_schema(tmp_path)}"
    raise AssertionError(kind)


# Over WebSockets with FileStore only: the transport is below the store, so what a kill can
# break there (a frame cut half way, a close handshake that never happens) is the same for
# every store; one store keeps the suite's runtime at +25% instead of doubling it.
@pytest.mark.parametrize(
    ("kind", "transport"),
    [
        ("file", "tcp"),
        ("sqlite", "tcp"),
        ("redis", "tcp"),
        ("postgres", "tcp"),
        ("file", "websockets"),
    ],
)
def test_sigkill_cycles_lose_nothing_and_duplicate_no_qos2(
    kind: str, transport: str, broker: MosquittoBroker, tmp_path: Path, protocol: ProtocolVersion
) -> None:
    figures = run_kill_cycles(
        broker.host,
        broker.port,
        store_spec(kind, tmp_path),
        cycles=CYCLES,
        seed=int(os.environ.get("KILL_SEED", "1")),
        protocol=protocol,
        transport=transport,
    )
    print(figures)
    assert figures.accepted == 1000
    assert figures.lost == [], f"accepted but never arrived: {figures.lost[:20]}"
    assert figures.qos2_duplicates == [], "QoS 2 delivered more than once"
    # Order as the children wrote it, per connection and topic (the subscriber's order is
    # mosquitto's: it may reorder after reconnects, so figures.out_of_order is only printed).
    assert figures.wire_out_of_order == [], figures.wire_out_of_order[:10]
    # The kills must land while the child is working, or the test proves nothing: every killed
    # child had accepted messages (not only the final one, which is never killed), and the
    # killed children together accepted a real share of the stream.
    assert figures.kills >= CYCLES // 2, f"only {figures.kills} kills before the child finished"
    assert len(figures.accepted_per_kill) == figures.kills
    assert min(figures.accepted_per_kill) >= 1, figures.accepted_per_kill
    assert sum(figures.accepted_per_kill) >= figures.kills
