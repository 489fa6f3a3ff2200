"""The broker fails with messages in flight (issue 10, item 1): restarted without its sessions,
or SIGKILLed with persistence on. See tests/support/scenarios/broker.py for how "in flight at
the moment of the fault" is made certain instead of a race.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mqtt_persist import DeliveryOutcome
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.scenarios.broker import run_broker_killed, run_broker_lost_session
from tests.support.stores import KINDS, make_store

pytestmark = pytest.mark.broker


def _redis_url(kind: str) -> str | None:
    if kind != "redis":
        return None
    from tests.support.redis_server import shared_redis_url

    return shared_redis_url()


@pytest.mark.parametrize("kind", KINDS)
async def test_broker_that_lost_the_session_gets_unacknowledged_messages_again_and_in_doubt_ones_reported(  # noqa: E501
    kind: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = make_store(kind, tmp_path, redis_url=_redis_url(kind))
    figures = await run_broker_lost_session(broker, store, store_name=kind)
    print(figures)
    notes = figures.notes
    released: list[int] = notes["qos2_released"]  # type: ignore[assignment]
    republished: list[int] = notes["republished"]  # type: ignore[assignment]
    # The QoS 2 messages past PUBREC are in doubt, nothing else; the rest went out again.
    assert notes["in_doubt_deliveries"] == released
    assert figures.in_doubt == len(released)
    assert notes["acknowledged"] == republished
    assert figures.requeued == len(republished)
    # Nothing accepted was lost; no QoS 2 message arrived twice (the in-doubt ones had arrived
    # once, before the restart, and were not re-published).
    assert figures.lost == []
    assert figures.qos2_duplicates == []
    arrivals: dict[int, int] = notes["arrivals"]  # type: ignore[assignment]
    assert all(arrivals[n] == 1 for n in released)
    # The ones the broker never had arrive exactly once, after the restart.
    assert all(arrivals[n] == 1 for n in notes["unsent"])  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_broker_sigkill_with_persistence_loses_nothing_and_duplicates_no_qos2(
    kind: str, broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    broker = broker_factory(persistence=True)
    store = make_store(kind, tmp_path, redis_url=_redis_url(kind))
    figures = await run_broker_killed(broker, store, store_name=kind)
    print(figures)
    assert figures.accepted == 36
    assert figures.lost == []
    assert figures.qos2_duplicates == []
    # The broker came back with the session: resumed, not re-published, nothing in doubt.
    assert figures.in_doubt == 0 and figures.requeued == 0
    assert figures.notes["outcomes"] == [DeliveryOutcome.ACKNOWLEDGED.value]
    assert figures.notes["resent_with_dup"] > 0  # type: ignore[operator]
    assert figures.notes["pubrel_after_restart"] > 0  # type: ignore[operator]
