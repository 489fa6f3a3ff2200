"""The store's disk fills up or turns read-only (issue 10, item 1): a typed StoreError, and
nothing ``publish()`` accepted is lost. FileStore and SQLiteStore on a small tmpfs the test
mounts (skipped, saying why, where mounting is not permitted; failed under CI).
See tests/support/scenarios/disk.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.scenarios.disk import run_disk_full, run_read_only
from tests.support.tmpfs import Tmpfs

pytestmark = pytest.mark.broker

TmpfsFactory = Callable[[int], Tmpfs]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_full_disk_gives_a_store_error_and_every_accepted_message_arrives(
    kind: str, broker: MosquittoBroker, tmpfs_factory: TmpfsFactory
) -> None:
    fs = tmpfs_factory(4 * 1024 * 1024)
    figures = await run_disk_full(broker, fs, kind)
    print(figures)
    notes = figures.notes
    assert notes["error"] is not None, "the disk never filled up"
    assert notes["typed"] is True, f"not a StoreError: {notes['error']}"
    assert notes["later_publish"] == "StoreError" or "Store" in str(notes["later_publish"])
    assert notes["accepted_offline"] > 0  # type: ignore[operator]
    assert figures.lost == [], f"accepted but never arrived: {figures.lost[:20]}"
    assert figures.qos2_duplicates == []
    assert notes["restored"] == "restored"


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_read_only_store_gives_a_store_error_and_loses_nothing_it_had(
    kind: str, broker: MosquittoBroker, tmpfs_factory: TmpfsFactory
) -> None:
    fs = tmpfs_factory(4 * 1024 * 1024)
    figures = await run_read_only(broker, fs, kind)
    print(figures)
    notes = figures.notes
    assert notes["failed_at"] in ("entering", "publish"), "a read-only store accepted a message"
    assert notes["typed"] is True, f"not a StoreError: {notes['error']}"
    assert figures.accepted == 30
    assert figures.lost == []
    assert figures.qos2_duplicates == []
