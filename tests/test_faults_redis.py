"""Redis stopped and restarted under a RedisStore client mid-stream (issue 10, item 1): typed
errors while it is down, recovery after, nothing accepted lost. The test's own redis-server
with an fsynced append-only file (see tests/support/scenarios/redis_outage.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.redis_server import RedisServer, redis_server_path
from tests.support.scenarios.redis_outage import run_redis_outage

pytestmark = pytest.mark.broker


@pytest.fixture
def redis_aof(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis", reason="redis-py not installed (pip install mqtt-persist[redis])")
    server = RedisServer(tmp_path / "redis", binary=redis_server_path(), appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_redis_outage_gives_store_errors_then_recovers_losing_nothing(
    hard: bool, broker: MosquittoBroker, redis_aof: RedisServer
) -> None:
    figures = await run_redis_outage(broker, redis_aof, hard=hard)
    print(figures)
    notes = figures.notes
    assert len(notes["publish_errors"]) == 3, "publish() succeeded while Redis was down"  # type: ignore[arg-type]
    assert notes["typed"] is True, notes["publish_errors"]
    assert notes["enter_typed"] is True, notes["enter_error"]
    assert notes["restored"] == "restored"
    assert figures.accepted == 220
    assert figures.lost == [], f"accepted but never arrived: {figures.lost[:20]}"
    assert figures.qos2_duplicates == []
