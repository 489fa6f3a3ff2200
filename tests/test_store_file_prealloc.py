"""FileStore's preallocated journal tail: what a crash can leave in it, and how it is read.

With fsync on, the store writes zeros ahead of its records and the records over them (see
``stores/file/journal.py``, "Preallocated tail"). A "crash" here is a copy of the journal's
bytes taken while the store still had it open, zeros and all, as a power cut would leave it.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from mqtt_persist.errors import SessionCorrupt
from mqtt_persist.session.state import InboundReceived, MessageAdded, Operation
from mqtt_persist.stores import FileStore
from mqtt_persist.stores.file import sizes
from tests.test_stores import _read, journal_records, msg, replay

BATCHES: list[list[Operation]] = [
    [MessageAdded(msg(n)), InboundReceived(n + 1)] for n in range(1, 8)
]


async def _crashed(directory: Path) -> tuple[Path, bytes, list[int]]:
    """Apply BATCHES; the journal's bytes as an open store leaves them, and each record's end."""
    ends: list[int] = []
    async with FileStore(directory) as store:
        for batch in BATCHES:
            await store.apply("a", batch)
            ends.append(len(journal_records(store.journal_path("a"))))
        path = store.journal_path("a")
        crashed = path.read_bytes()
    return path, crashed, ends


def _corrupt_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".corrupt-" in p.name]


async def test_an_open_journal_ends_in_preallocated_zeros(tmp_path: Path) -> None:
    path, crashed, ends = await _crashed(tmp_path / "s")
    assert len(crashed) % sizes.PREALLOC_CHUNK == 0 and len(crashed) > ends[-1]
    assert crashed[ends[-1] :] == bytes(len(crashed) - ends[-1])
    # A graceful close gives the zeros back: the file is its records (and the last access
    # that closing recorded).
    closed = path.read_bytes()
    assert closed == journal_records(path) and closed.startswith(crashed[: ends[-1]])


async def test_a_zero_tail_after_a_crash_is_free_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, crashed, _ = await _crashed(tmp_path / "s")
    path.write_bytes(crashed)
    with caplog.at_level(logging.WARNING):
        async with FileStore(tmp_path / "s") as store:
            assert await store.load("a") == replay("a", BATCHES)
            # Appends go into the zeros that are there; the file does not grow.
            await store.apply("a", [MessageAdded(msg(50))])
            assert path.stat().st_size == len(crashed)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", [*BATCHES, [MessageAdded(msg(50))]])
    assert _corrupt_files(tmp_path / "s") == []


@pytest.mark.parametrize("torn_bytes", [1, 9, 30])
async def test_a_torn_record_in_the_preallocated_area_is_cut(
    tmp_path: Path, torn_bytes: int
) -> None:
    path, crashed, ends = await _crashed(tmp_path / "s")
    # The last record only partly reached the disk; zeros follow it as before.
    torn = bytearray(crashed)
    torn[ends[-2] + torn_bytes : ends[-1]] = bytes(ends[-1] - ends[-2] - torn_bytes)
    path.write_bytes(bytes(torn))
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", BATCHES[:-1])
        assert path.read_bytes() == crashed[: ends[-2]]  # cut, zeros and all
        # Reopened and appended after the repair: a clean journal, nothing of the torn record.
        await store.apply("a", [MessageAdded(msg(60))])
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", [*BATCHES[:-1], [MessageAdded(msg(60))]])
    assert _corrupt_files(tmp_path / "s") == []


async def test_a_lost_page_before_records_that_did_reach_the_disk_is_cut(tmp_path: Path) -> None:
    """Unsynced writes reach the disk page by page in any order: a record whose page was lost
    (zeros up to a page boundary) can precede records that made it. None was acknowledged."""
    path, crashed, ends = await _crashed(tmp_path / "s")
    lost_from = ends[-4]
    page_end = lost_from + 512 - lost_from % 512
    assert page_end - lost_from >= 32, "the test needs a record well inside a sector"
    assert page_end < ends[-1]
    lost = bytearray(crashed)
    lost[lost_from:page_end] = bytes(page_end - lost_from)
    path.write_bytes(bytes(lost))
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", BATCHES[:-3])
        assert path.read_bytes() == crashed[:lost_from]
        await store.apply("a", [MessageAdded(msg(70))])
    async with FileStore(tmp_path / "s") as store:
        # The records after the lost page were cut with it: none comes back.
        assert await store.load("a") == replay("a", [*BATCHES[:-3], [MessageAdded(msg(70))]])
    assert _corrupt_files(tmp_path / "s") == []


async def test_other_damage_before_valid_records_is_still_corruption(tmp_path: Path) -> None:
    path, crashed, ends = await _crashed(tmp_path / "s")
    damaged = bytearray(crashed)
    damaged[ends[-4] + 20] ^= 0x10  # a flipped bit is not what a crash leaves
    path.write_bytes(bytes(damaged))
    async with FileStore(tmp_path / "s") as store:
        with pytest.raises(SessionCorrupt) as info:
            await store.load("a")
    assert info.value.quarantined_to is not None
    quarantined = Path(info.value.quarantined_to)
    assert _read(quarantined) == bytes(damaged)  # kept whole


async def test_zeros_that_do_not_fit_leave_the_record_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preallocation is a speed-up: a full disk refusing the zeros fails nothing; a record
    that does not fit fails as it always did (tests/test_store_write_path.py, full disk)."""
    real_pwrite = os.pwrite
    refused: list[int] = []

    def no_room_for_zeros(fd: int, data: Any, offset: int) -> int:
        if len(data) > 64 and not bytes(data).strip(b"\0"):
            refused.append(len(data))
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real_pwrite(fd, data, offset)

    async with FileStore(tmp_path / "s") as store:
        await store.apply("a", BATCHES[0])
        monkeypatch.setattr(os, "pwrite", no_room_for_zeros)
        for batch in BATCHES[1:]:
            await store.apply("a", batch)
        assert refused  # every append tried, as the file never grew past its records
        path = store.journal_path("a")
        assert len(_read(path)) == len(journal_records(path))
        monkeypatch.undo()
    async with FileStore(tmp_path / "s") as store:
        assert await store.load("a") == replay("a", BATCHES)
