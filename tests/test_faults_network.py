"""Network faults during a mixed QoS 1/2 stream in both directions (issue 10, item 1).

Cuts, torn packets, lost acknowledgements either way and a black-holed connection, injected
through the MQTT-aware proxy after every N PUBLISH packets the client wrote, against a real
mosquitto, counted by an independent paho subscriber. Nothing accepted is lost, no QoS 2
message arrives twice (outbound at the subscriber, inbound at the application), and each
connection carries each topic's messages in order. See tests/support/scenarios/network.py.

The 60-second soak (a fault every 200 ms) is marked ``soak`` and runs with ``--soak`` or in
benchmarks/fault_matrix.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.scenarios.network import FAULT_KINDS, run_network_faults
from tests.support.stores import KINDS, make_store

pytestmark = pytest.mark.broker


def _redis_url(kind: str) -> str | None:
    if kind != "redis":
        return None
    from tests.support.redis_server import shared_redis_url

    return shared_redis_url()


@pytest.mark.parametrize("kind", KINDS)
async def test_network_faults_lose_nothing_duplicate_no_qos2_and_keep_wire_order(
    kind: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = make_store(kind, tmp_path, redis_url=_redis_url(kind))
    figures = await run_network_faults(broker, store, store_name=kind, messages=600, every=60)
    print(figures)
    notes = figures.notes
    # The faults really happened, mid-stream, and each kind at least once.
    assert set(notes["injected"]) == set(FAULT_KINDS), notes["injected"]  # type: ignore[arg-type]
    assert notes["connections"] >= figures.faults  # type: ignore[operator]
    assert figures.accepted == 600
    assert figures.lost == [], f"accepted but never arrived: {figures.lost[:20]}"
    assert figures.qos2_duplicates == [], "QoS 2 delivered more than once"
    assert notes["wire_order"] == [], "a connection carried a topic out of order"
    # The broker kept the session through every fault: nothing was in doubt or re-published.
    assert figures.in_doubt == 0 and figures.requeued == 0
    # Inbound: the client's application got every QoS 2 message exactly once.
    assert notes["inbound_lost"] == 0
    assert notes["inbound_qos2_duplicates"] == 0
    # Resends happened both ways, so the duplicate handling was exercised, not skipped.
    assert notes["outbound_resends"] > 0  # type: ignore[operator]


@pytest.mark.soak
@pytest.mark.parametrize("kind", KINDS)
async def test_network_soak_a_fault_every_200ms_for_60s(
    kind: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = make_store(kind, tmp_path, redis_url=_redis_url(kind))
    figures = await run_network_faults(
        broker, store, store_name=kind, duration=60.0, interval=0.2, timeout=300
    )
    print(figures)
    assert figures.faults >= 200
    assert figures.lost == []
    assert figures.qos2_duplicates == []
    assert figures.notes["wire_order"] == []
    assert figures.notes["inbound_lost"] == 0
    assert figures.notes["inbound_qos2_duplicates"] == 0
