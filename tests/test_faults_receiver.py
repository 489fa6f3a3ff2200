"""A receiving client SIGKILLed repeatedly while its last acknowledgements are dropped
(issue 10, item 1): no QoS 2 message reaches the application twice, across kills.

See tests/support/scenarios/receiver.py. Messages the child had received but not yet printed
when it was killed are lost for the application today (acknowledged on hand-over to
``client.messages``, from the commit of the message's packet ID on: issue 11); they are
counted, not asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.scenarios.receiver import run_receiver_kills
from tests.support.stores import DURABLE_KINDS, store_spec

pytestmark = pytest.mark.broker


def _spec(kind: str, tmp_path: Path) -> str:
    redis_url = None
    if kind == "redis":
        from tests.support.redis_server import shared_redis_url

        redis_url = shared_redis_url()
    return store_spec(kind, tmp_path, redis_url=redis_url)


@pytest.mark.parametrize("kind", DURABLE_KINDS)
async def test_killed_receiver_never_hands_a_qos2_message_to_the_application_twice(
    kind: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    figures = await run_receiver_kills(broker, _spec(kind, tmp_path), store_name=kind, kills=3)
    print(figures)
    assert figures.qos2_duplicates == [], "a QoS 2 message reached the application twice"
    # Every kill landed after the application had printed messages whose acknowledgement
    # was lost, so the broker had to send them again, and it did.
    per_kill: list[dict[str, int]] = figures.notes["per_kill"]  # type: ignore[assignment]
    assert len(per_kill) == 3
    assert all(k["printed_unacknowledged"] >= 3 for k in per_kill), per_kill
    assert figures.notes["broker_resends"] > 0  # type: ignore[operator]
    assert figures.notes["duplicates_suppressed"] > 0  # type: ignore[operator]
    assert figures.notes["final_child_closed_cleanly"] is True
    # What never reached the application is issue 11's kind only: a killed child had taken
    # it in (written PUBREC, or committed its ID before the PUBREC went out) and died before
    # printing it.
    assert figures.notes["lost_unexplained"] == [], (
        figures.notes["lost_unexplained"],
        figures.notes["unexplained_trace"],
    )


async def test_control_a_receiver_whose_store_dies_with_it_does_deliver_twice(
    broker: MosquittoBroker,
) -> None:
    # The same scenario with a MemoryStore in the child: the stored packet IDs die with the
    # process, so the broker's resends reach the next child's application again. This is the
    # failure the test above guards against, shown to be visible to it.
    figures = await run_receiver_kills(broker, "memory:", store_name="memory", kills=1)
    print(figures)
    assert figures.qos2_duplicates != []
