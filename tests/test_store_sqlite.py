"""SQLiteStore beyond the conformance suite (tests/test_stores.py runs that for it too).

Settings, transactions, partial restores of a long queue, damaged rows and files, format
versions, file modes, leases across processes and SIGKILL in the middle of applies.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import stat
import tempfile
import textwrap
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_persist.errors import (
    InvalidClientId,
    SessionCorrupt,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageRemoved,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
)
from mqtt_persist.stores import SQLiteStore
from mqtt_persist.stores import sqlite as sqlite_module
from mqtt_persist.stores.sqlite import operations as sqlite_operations
from mqtt_persist.stores.sqlite import rows as sqlite_rows
from mqtt_persist.stores.sqlite import schema as sqlite_schema
from tests.support.store_kill import VICTIM, Batches, kill_rounds
from tests.test_stores import (
    _BATCHES,
    T0,
    FakeClock,
    cancel_applies,
    check_lease_across_processes,
    every_operation,
    msg,
    replay,
    store_ops,
)

_T = typing.TypeVar("_T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "s.db"


@pytest.fixture
async def store(db: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(db, clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def in_worker(store: SQLiteStore, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``fn`` on the store's own connection, in its worker thread."""
    return await store._run(lambda: fn(store._db()))


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A second connection, as another process (or a person with the sqlite3 shell) has."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.text_factory = bytes  # garbage text must be readable too
    return closing(conn)


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# Plain functions, so the async tests do not call blocking pathlib methods themselves.
def _read(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def _write(path: Path | str, data: bytes) -> None:
    Path(path).write_bytes(data)


def _exists(path: Path | str) -> bool:
    return Path(path).exists()


def _listing(directory: Path | str) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "level"), [("FULL", 2), ("NORMAL", 1), ("EXTRA", 3)])
async def test_wal_and_synchronous_are_applied(db: Path, setting: str, level: int) -> None:
    async with SQLiteStore(db, synchronous=setting) as store:  # type: ignore[arg-type]
        assert await in_worker(store, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == (
            level
        )
        assert await in_worker(store, lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == (
            "wal"
        )
        assert store.durable
    with raw(db) as conn:  # WAL mode, application id and version belong to the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == b"wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == sqlite_module.APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.FORMAT_VERSION


def test_unknown_synchronous_setting_is_refused(db: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(db, synchronous="OFF")  # type: ignore[arg-type]


# --- transactions -------------------------------------------------------------------------------


async def test_one_transaction_per_apply(store: SQLiteStore) -> None:
    statements: list[str] = []
    await in_worker(store, lambda c: c.set_trace_callback(statements.append))
    batches: list[list[Operation]] = [
        [MessageAdded(msg(0))],
        [MessageAdded(msg(s)) for s in range(1, 101)],
        [PacketIdAssigned(s, s) for s in range(1, 51)]
        + [MessageRemoved(s) for s in range(51, 101)],
    ]
    for batch in batches:
        statements.clear()
        await store.apply("a", batch)
        control = [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK")]
        assert control == ["BEGIN IMMEDIATE", "COMMIT"]
    statements.clear()
    await store.apply("b", every_operation())
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    await in_worker(store, lambda c: c.set_trace_callback(None))
    assert await store.load("b") == replay("b", [every_operation()])


async def test_a_failing_batch_applies_nothing(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])

    def fail(conn: sqlite3.Connection, sid: int, ops: list[Operation]) -> None:
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    # MessageAdded and InboundReceived run first, then the failure: none of it may stay.
    monkeypatch.setitem(sqlite_operations.HANDLERS, MessageRemoved, fail)
    with pytest.raises(StoreError, match="simulated"):
        await store.apply("a", [MessageAdded(msg(2)), InboundReceived(3), MessageRemoved(1)])
    monkeypatch.undo()
    assert await store.load("a") == replay("a", [[MessageAdded(msg(1))]])
    [info] = await store.list_sessions()
    assert (info.inflight, info.queued) == (0, 1)


async def test_cancelled_applies_leave_a_consistent_store(db: Path) -> None:
    store = SQLiteStore(db)
    await store.apply("a", [MessageAdded(msg(0))])
    assert await cancel_applies(store, lambda n: [MessageAdded(msg(n)), InboundReceived(n)])
    in_store = await store.load("a")
    assert in_store is not None
    # Every batch is all or nothing: message n is there exactly when inbound n is.
    assert {s for s in in_store.messages if s} == in_store.inbound_qos2
    await store.close()
    async with SQLiteStore(db) as reopened:
        assert await reopened.load("a") == in_store


# --- counts, last_seq and partial loads -------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(store_ops, min_size=1, max_size=10), min_size=1, max_size=8),
    limit=st.integers(0, 6),
)
def test_counts_last_seq_and_partial_loads_follow_the_replay(
    batches: list[list[Operation]], limit: int
) -> None:
    expected = replay("c", batches)
    inflight = [m for m in expected.messages.values() if m.packet_id is not None]
    queued = [m for m in expected.messages.values() if m.packet_id is None]

    async def scenario(path: Path) -> None:
        async with SQLiteStore(path / "s.db", synchronous="NORMAL") as store:
            for batch in batches:
                await store.apply("c", batch)
            [info] = await store.list_sessions()
            assert (info.inflight, info.queued) == (len(inflight), len(queued))
            partial = await store.load("c", queued_limit=limit)
            assert partial is not None
            assert list(partial.messages.values()) == sorted(
                inflight + queued[:limit], key=lambda m: m.seq
            )
            assert partial.queued_not_loaded == max(0, len(queued) - limit)
            assert partial.last_seq == expected.last_seq
            full = await store.load("c")
            assert full == expected
            assert full is not None and full.last_seq == expected.last_seq
            assert full.queued_not_loaded == 0
            after = queued[0].seq if queued else 0
            assert (
                await store.read_queued("c", after, 3) == [m for m in queued if m.seq > after][:3]
            )

    with tempfile.TemporaryDirectory() as path:
        asyncio.run(scenario(Path(path)))


async def test_queued_limit_reads_only_the_prefix(db: Path) -> None:
    queued_total = 100_000
    # In flight: the 10 lowest and the 10 highest seqs; queued: the 100,000 in between.
    last = queued_total + 20
    async with SQLiteStore(db, synchronous="NORMAL") as store:
        for start in range(1, last + 1, 20_004):
            end = min(start + 20_004, last + 1)
            await store.apply(
                "big",
                [MessageAdded(StoredMessage(s, "t", b"x" * 64, 1)) for s in range(start, end)],
            )
        inflight = [*range(1, 11), *range(last - 9, last + 1)]
        await store.apply("big", [PacketIdAssigned(s, s % 65535 + 1) for s in inflight])
        # The highest seq ever added is gone, but must still be reported.
        await store.apply("big", [MessageAdded(msg(last + 1)), MessageRemoved(last + 1)])
        [info] = await store.list_sessions()
        assert (info.inflight, info.queued) == (20, queued_total)

    # The work is counted in SQLite VM steps (a progress handler), not timed: a load that read
    # the whole queue would take about 100 times the steps of one that reads its front.
    async with SQLiteStore(db, synchronous="NORMAL") as store:
        work: list[int] = []

        def count_steps() -> int:
            work.append(1)
            return 0

        await in_worker(store, lambda c: c.set_progress_handler(count_steps, 100))
        state = await store.load("big", queued_limit=100)
        limited_work = len(work)
        assert state is not None
        assert list(state.messages) == sorted([*inflight, *range(11, 111)])
        assert all(state.messages[s].packet_id == s % 65535 + 1 for s in inflight)
        assert state.queued_not_loaded == queued_total - 100
        assert state.last_seq == last + 1

        # Paging through the queue from the store: every queued message once, in order.
        seqs: list[int] = []
        after = 0
        while page := await store.read_queued("big", after, 25_000):
            seqs.extend(m.seq for m in page)
            after = page[-1].seq
        assert seqs == list(range(11, queued_total + 11))

        work.clear()
        everything = await store.load("big")
        assert everything is not None and len(everything.messages) == queued_total + 20
        assert everything.queued_not_loaded == 0 and everything.last_seq == last + 1
        # The limited load did a tiny fraction of the VM steps of reading every row.
        assert limited_work * 100 < len(work), (limited_work, len(work))
        await in_worker(store, lambda c: c.set_progress_handler(None, 0))


async def test_query_plans_are_range_scans(store: SQLiteStore) -> None:
    def plans(conn: sqlite3.Connection) -> list[str]:
        return [
            " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
            for sql, params in [
                (sqlite_rows.SELECT_INFLIGHT, (1,)),
                (sqlite_rows.SELECT_QUEUED_FIRST, (1, 10)),
                (sqlite_rows.SELECT_QUEUED_AFTER, (1, 5, 10)),
            ]
        ]

    inflight, first, after = await in_worker(store, plans)
    assert inflight == "SEARCH messages USING INDEX messages_inflight (sid=?)"
    # No sort step: the rows come in seq order from the primary key (sid, seq).
    assert first == "SEARCH messages USING PRIMARY KEY (sid=?)"
    assert after == "SEARCH messages USING PRIMARY KEY (sid=? AND seq>?)"


async def test_save_keeps_created_at_ttl_and_last_seq(store: SQLiteStore, clock: FakeClock) -> None:
    await store.apply("a", [MessageAdded(msg(1)), MessageAdded(msg(9)), MessageRemoved(9)])
    await store.update_ttl("a", 100)
    clock.advance(5)
    snapshot = replay("a", [[MessageAdded(msg(2)), SubscriptionSet("s", 1)]])
    await store.save(snapshot)
    state = await store.load("a")
    assert state == snapshot
    assert state is not None and state.last_seq == 9  # a seq once handed out is never reused
    [info] = await store.list_sessions()
    assert (info.created_at, info.expires_at) == (T0, T0 + 105)


# --- damage -------------------------------------------------------------------------------------

_TABLES = ("messages", "inbound", "subscriptions", "pending_unsubscribes", "set_aside")

_GARBAGE = [
    ("qos-7", "messages", "UPDATE messages SET qos = 7 WHERE sid = :sid AND seq = 2"),
    ("null-topic", "messages", "UPDATE messages SET topic = NULL WHERE sid = :sid AND seq = 2"),
    (
        "payload-not-bytes",
        "messages",
        "UPDATE messages SET payload = 'text' WHERE sid = :sid AND seq = 3",
    ),
    (
        "topic-not-utf8",
        "messages",
        "UPDATE messages SET topic = CAST(X'C328FF' AS TEXT) WHERE sid = :sid AND seq = 3",
    ),
    ("seq-not-integer", "messages", "UPDATE messages SET seq = 2.5 WHERE sid = :sid AND seq = 2"),
    (
        "packet-id-out-of-range",
        "messages",
        "UPDATE messages SET packet_id = 70000 WHERE sid = :sid AND seq = 1",
    ),
    ("retain-2", "messages", "UPDATE messages SET retain = 2 WHERE sid = :sid AND seq = 1"),
    ("inbound-text", "inbound", "UPDATE inbound SET packet_id = 'x' WHERE sid = :sid"),
    ("subscription-qos", "subscriptions", "UPDATE subscriptions SET qos = 9 WHERE sid = :sid"),
    (
        "filter-not-utf8",
        "pending_unsubscribes",
        "UPDATE pending_unsubscribes SET filter = CAST(X'FF' AS TEXT) WHERE sid = :sid",
    ),
    (
        "created-at-text",
        "sessions",
        "UPDATE sessions SET created_at = 'yesterday' WHERE sid = :sid",
    ),
    ("negative-count", "sessions", "UPDATE sessions SET queued = -1 WHERE sid = :sid"),
    (
        "properties-not-bytes",
        "messages",
        "UPDATE messages SET properties = 'p' WHERE sid = :sid AND seq = 2",
    ),
    ("properties-null", "messages", "UPDATE messages SET properties = NULL WHERE sid = :sid"),
    ("expiry-text", "messages", "UPDATE messages SET expires_at = 'soon' WHERE sid = :sid"),
    ("expiry-infinite", "messages", "UPDATE messages SET expires_at = 9e999 WHERE sid = :sid"),
    ("options-3", "subscriptions", "UPDATE subscriptions SET options = 48 WHERE sid = :sid"),
    ("options-qos", "subscriptions", "UPDATE subscriptions SET options = 1 WHERE sid = :sid"),
    (
        "subscription-id-0",
        "subscriptions",
        "UPDATE subscriptions SET subscription_id = 0 WHERE sid = :sid",
    ),
    ("protocol-3", "sessions", "UPDATE sessions SET protocol_version = 3 WHERE sid = :sid"),
    ("aside-reason-null", "set_aside", "UPDATE set_aside SET reason = NULL WHERE sid = :sid"),
    ("aside-qos-9", "set_aside", "UPDATE set_aside SET qos = 9 WHERE sid = :sid"),
    ("aside-time", "set_aside", "UPDATE set_aside SET set_aside_at = X'00' WHERE sid = :sid"),
    ("aside-payload", "set_aside", "UPDATE set_aside SET payload = 1 WHERE sid = :sid"),
]

_SESSION_OPS: list[Operation] = [
    MessageAdded(msg(1, packet_id=5)),
    MessageAdded(msg(2)),
    MessageAdded(msg(3)),
    InboundReceived(7),
    SubscriptionSet("s/#", 1, confirmed=True),
    SubscriptionRemoved("old/+", unsubscribe_pending=True),
    MessageAdded(StoredMessage(8, "v5", b"8", 2, properties=b"\x01\x01", expires_at=T0)),
    MessageAdded(StoredMessage(9, "poison", b"9", 1, properties=b"\x01\x00")),
    MessageSetAside(9, "refused", T0),
    SubscriptionSet("v5/#", 2, options=0x2C, subscription_id=7),
    ProtocolVersionSet(5),
]


def _quoted_rows(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> list[tuple[object, ...]]:
    """Rows as SQL literals: the exact value and its storage class (NULL, 2.5, 'x', X'FF')."""
    return sorted(conn.execute(sql, params).fetchall())


_SET_ASIDE_QUOTED = (
    "quote(seq), quote(topic), quote(payload), quote(qos), quote(retain), quote(properties), "
    "quote(expires_at), quote(reason), quote(set_aside_at)"
)


def _session_rows(conn: sqlite3.Connection, sid: int) -> dict[str, list[tuple[object, ...]]]:
    quote = {
        "sessions": "quote(client_id), quote(created_at), quote(last_access), quote(ttl), "
        "quote(last_seq), quote(inflight), quote(queued), quote(protocol_version)",
        "messages": "quote(seq), quote(topic), quote(payload), quote(qos), quote(retain), "
        "quote(packet_id), quote(released), quote(properties), quote(expires_at)",
        "inbound": "quote(packet_id)",
        "subscriptions": "quote(filter), quote(qos), quote(confirmed), quote(options), "
        "quote(subscription_id)",
        "pending_unsubscribes": "quote(filter)",
        "set_aside": _SET_ASIDE_QUOTED,
    }
    return {
        table: _quoted_rows(conn, f"SELECT {columns} FROM {table} WHERE sid = ?", (sid,))
        for table, columns in quote.items()
    }


def _quarantined_rows(conn: sqlite3.Connection, qid: int) -> dict[str, list[tuple[object, ...]]]:
    quote = {
        "quarantine": "quote(client_id), quote(created_at), quote(last_access), quote(ttl), "
        "quote(last_seq), quote(inflight), quote(queued), quote(protocol_version)",
        "quarantine_messages": "quote(seq), quote(topic), quote(payload), quote(qos), "
        "quote(retain), quote(packet_id), quote(released), quote(properties), quote(expires_at)",
        "quarantine_inbound": "quote(packet_id)",
        "quarantine_subscriptions": "quote(filter), quote(qos), quote(confirmed), "
        "quote(options), quote(subscription_id)",
        "quarantine_pending_unsubscribes": "quote(filter)",
        "quarantine_set_aside": _SET_ASIDE_QUOTED,
    }
    return {
        table.removeprefix("quarantine_").replace("quarantine", "sessions"): _quoted_rows(
            conn, f"SELECT {columns} FROM {table} WHERE qid = ?", (qid,)
        )
        for table, columns in quote.items()
    }


@pytest.mark.parametrize(("table", "sql"), [g[1:] for g in _GARBAGE], ids=[g[0] for g in _GARBAGE])
async def test_garbage_row_quarantines_the_session(
    store: SQLiteStore, db: Path, table: str, sql: str
) -> None:
    for client_id in ("a", "b"):
        await store.apply(client_id, _SESSION_OPS)
    with raw(db) as conn:
        [(sid,)] = conn.execute("SELECT sid FROM sessions WHERE client_id = 'a'").fetchall()
        conn.execute(sql, {"sid": sid})
        damaged = _session_rows(conn, sid)

    with pytest.raises(SessionCorrupt) as info:
        await store.load("a")
    exc = info.value
    assert not isinstance(exc, UnsupportedFormatVersion)
    assert exc.location == str(db)
    assert str(db) in str(exc) and f"table {table}" in str(exc) and "'a'" in str(exc)
    assert exc.quarantined_to is not None and "qid" in exc.quarantined_to

    with raw(db) as conn:
        [(qid, reason)] = conn.execute("SELECT qid, reason FROM quarantine").fetchall()
        assert f"table {table}".encode() in reason
        # Moved, not deleted: every row of the session, byte for byte, garbage included.
        assert _quarantined_rows(conn, qid) == damaged
        assert _session_rows(conn, sid) == {t: [] for t in ("sessions", *_TABLES)}
    assert await store.load("b") == replay("b", [_SESSION_OPS])  # the other session is fine
    assert await store.load("a") is None
    await store.apply("a", [MessageAdded(msg(4))])  # a new session may start
    assert await store.load("a") == replay("a", [[MessageAdded(msg(4))]])


async def test_garbage_beyond_the_loaded_prefix_is_found_by_read_queued(
    store: SQLiteStore, db: Path
) -> None:
    await store.apply("a", [MessageAdded(msg(s)) for s in range(1, 101)])
    with raw(db) as conn:
        conn.execute("UPDATE messages SET payload = NULL WHERE seq = 50")
    state = await store.load("a", queued_limit=10)
    assert state is not None and state.queued_not_loaded == 90
    assert [m.seq for m in await store.read_queued("a", 10, 39)] == list(range(11, 50))
    with pytest.raises(SessionCorrupt, match="payload None is not a BLOB") as info:
        await store.read_queued("a", 10, 100)
    assert info.value.quarantined_to is not None
    with raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM quarantine_messages").fetchone()[0] == 100
    assert await store.read_queued("a", 0, 10) == []


async def test_list_sessions_and_exists_skip_damaged_metadata(store: SQLiteStore, db: Path) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    await store.apply("b", [MessageAdded(msg(1))])
    with raw(db) as conn:
        conn.execute("UPDATE sessions SET last_access = X'00' WHERE client_id = 'b'")
    assert [info.client_id for info in await store.list_sessions()] == ["a"]
    assert await store.exists("b")  # load reports it (and quarantines it)
    with pytest.raises(SessionCorrupt, match="last_access"):
        await store.load("b")
    assert await store.cleanup_expired() == 0


_STAMPED = re.compile(r"s\.db\.corrupt-\d{8}T\d{6}\.\d{6}Z(-\d+)?$")


async def test_a_file_that_is_not_a_database_is_moved_aside(db: Path) -> None:
    garbage = b"this is no SQLite database, just bytes " * 200
    _write(db, garbage)
    stale_wal = f"{db}-wal"
    _write(stale_wal, b"a WAL that belongs to the garbage")
    store = SQLiteStore(db)
    with pytest.raises(SessionCorrupt, match="not a database") as info:
        await store.open()
    exc = info.value
    assert not isinstance(exc, UnsupportedFormatVersion)
    assert exc.location == str(db)
    assert exc.quarantined_to is not None
    moved = Path(exc.quarantined_to)
    assert _STAMPED.match(moved.name), moved.name
    assert _read(moved) == garbage  # intact, never deleted
    # Its WAL went with it: left behind, SQLite would replay it into the new database.
    assert _read(f"{moved}-wal") == b"a WAL that belongs to the garbage"
    assert not _exists(db) and not _exists(stale_wal)
    # The next call starts a new database.
    await store.apply("a", [MessageAdded(msg(1))])
    assert await store.load("a") == replay("a", [[MessageAdded(msg(1))]])
    await store.close()


async def test_a_malformed_database_is_moved_aside(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.apply("a", [MessageAdded(msg(s, payload=bytes(500))) for s in range(100)])
    assert not _exists(f"{db}-wal")  # checkpointed into the file at close
    data = bytearray(_read(db))
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page_size
    data[page_size:] = b"\xab" * (len(data) - page_size)  # every page but the schema's
    _write(db, bytes(data))
    store = SQLiteStore(db)
    with pytest.raises(SessionCorrupt, match="malformed") as info:
        await store.load("a")
    assert info.value.quarantined_to is not None
    moved = Path(info.value.quarantined_to)
    assert _STAMPED.match(moved.name) and _read(moved) == data
    # Nothing was left behind or recreated under the old names (its WAL files moved with it).
    assert {name.removesuffix("-wal").removesuffix("-shm") for name in _listing(db.parent)} == {
        moved.name,
        "s.db.locks",
    }
    assert await store.load("a") is None
    await store.close()


async def test_newer_format_version_is_left_in_place(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.apply("a", [MessageAdded(msg(1))])
    with raw(db) as conn:
        conn.execute(f"PRAGMA user_version = {sqlite_module.FORMAT_VERSION + 1}")
    before = _read(db)
    store = SQLiteStore(db)
    with pytest.raises(UnsupportedFormatVersion, match="newer") as info:
        await store.load("a")
    assert info.value.location == str(db) and info.value.quarantined_to is None
    with pytest.raises(UnsupportedFormatVersion):
        await store.open()
    await store.close()
    assert _read(db) == before  # the newer library that wrote it can still use it
    assert [name for name in _listing(db.parent) if "corrupt" in name] == []


async def test_unknown_old_version_is_moved_aside(db: Path) -> None:
    async with SQLiteStore(db):
        pass
    with raw(db) as conn:
        conn.execute("PRAGMA user_version = 0")  # our application id, a version never written
    store = SQLiteStore(db)
    with pytest.raises(SessionCorrupt, match="format version 0") as info:
        await store.open()
    await store.close()
    assert info.value.quarantined_to is not None and _exists(info.value.quarantined_to)


async def test_another_applications_database_is_not_touched(db: Path) -> None:
    store = SQLiteStore(db)
    for setup, message in [
        ("CREATE TABLE invoices (id INTEGER PRIMARY KEY)", "0x00000000"),
        ("PRAGMA application_id = 42", "0x0000002a"),
        ("PRAGMA user_version = 7", "0x0000002a"),
    ]:
        with raw(db) as conn:
            conn.execute(setup)
        before = _read(db)
        with pytest.raises(StoreError, match=f"another application.*{message}") as info:
            await store.open()
        assert not isinstance(info.value, SessionCorrupt)
        assert _read(db) == before  # not even switched to WAL mode
    await store.close()
    assert _listing(db.parent) == ["s.db"]


async def test_migration_hook_upgrades_an_older_version(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SQLiteStore(db) as store:
        await store.apply("a", [MessageAdded(msg(1))])
    calls: list[bool] = []

    current = sqlite_schema.FORMAT_VERSION

    def migrate_to_next(conn: sqlite3.Connection) -> None:
        calls.append(conn.in_transaction)
        conn.execute("ALTER TABLE sessions ADD COLUMN note TEXT")

    monkeypatch.setattr(sqlite_schema, "FORMAT_VERSION", current + 1)
    monkeypatch.setitem(sqlite_schema.MIGRATIONS, current, migrate_to_next)
    async with SQLiteStore(db) as store:
        assert await store.load("a") == replay("a", [[MessageAdded(msg(1))]])
    assert calls == [True]  # once, inside the upgrade's transaction
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
        assert b"note" in [row[1] for row in conn.execute("PRAGMA table_info(sessions)")]
    async with SQLiteStore(db) as store:
        await store.open()
    assert calls == [True]


# --- files and leases ---------------------------------------------------------------------------


async def test_file_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # a permissive umask must not make anything readable
    try:
        db = tmp_path / "new" / "s.db"
        async with SQLiteStore(db) as store:
            await store.acquire("a")
            await store.apply("a", [MessageAdded(msg(1))])
            assert _mode(db.parent) == 0o700
            for name in ("s.db", "s.db-wal", "s.db-shm"):
                assert _mode(db.parent / name) == 0o600, name
            assert _mode(f"{db}.locks") == 0o700
            assert _mode(store.lock_path("a")) == 0o600
            assert store.lock_path("a").parent == Path(f"{db}.locks")
    finally:
        os.umask(old_umask)


async def test_hostile_client_ids_get_safe_lock_files(store: SQLiteStore, db: Path) -> None:
    ids = ["../../escape", "a/b", "/abs", "..", "ünïcødé 🚀", "x" * 5000, "ABC", "abc", "", "\x00"]
    for i, client_id in enumerate(ids):
        await store.apply(client_id, [MessageAdded(msg(i))])
    names = _listing(f"{db}.locks")
    assert len({name.lower() for name in names}) == len(ids)
    assert all(len(name) < 100 for name in names)
    assert _listing(db.parent) == sorted(["s.db", "s.db-wal", "s.db-shm", "s.db.locks"])
    for i, client_id in enumerate(ids):
        state = await store.load(client_id)
        assert state is not None and list(state.messages) == [i]


async def test_lock_file_is_removed_with_its_session(store: SQLiteStore) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    lock = store.lock_path("a")
    await store.release("a")
    assert lock.exists()  # the session is still stored
    await store.delete("a")
    assert not lock.exists()
    await store.acquire("b")
    await store.release("b")
    assert not store.lock_path("b").exists()


async def test_a_second_store_in_this_process_is_locked_out(store: SQLiteStore, db: Path) -> None:
    other = SQLiteStore(db)
    await store.acquire("a")
    with pytest.raises(SessionLocked):
        await other.acquire("a")
    await store.apply("a", [MessageAdded(msg(1))])
    for call in (
        other.apply("a", [MessageAdded(msg(2))]),
        other.load("a"),
        other.read_queued("a", 0, 10),
        other.delete("a"),
        other.update_ttl("a", 5),
    ):
        with pytest.raises(SessionLocked):
            await call
    assert [info.client_id for info in await other.list_sessions()] == ["a"]
    assert await other.exists("a")
    await store.release("a")
    await other.acquire("a")
    assert await other.load("a") == replay("a", [[MessageAdded(msg(1))]])
    await other.close()


async def test_lease_across_processes(store: SQLiteStore, db: Path) -> None:
    await check_lease_across_processes(store, SQLiteStore, str(db))


# --- SIGKILL ------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    from mqtt_persist.stores.sqlite import SQLiteStore
    from tests.support.store_kill import write_batches

    async def checkpoint_often(store):
        # Checkpoint every few commits, so that kills also land in the middle of checkpoints.
        await store._run(lambda: store._db().execute("PRAGMA wal_autocheckpoint = 8"))

    write_batches(lambda args: SQLiteStore(args[0]), make_batch, prepare=checkpoint_often)
    """
)


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    batches = Batches(_BATCHES)
    batch_size: Callable[[int], int] = batches.namespace["batch_size"]
    partial: SessionState | None = None  # each recovery's load(queued_limit=3), checked below

    async def load() -> SessionState | None:
        nonlocal partial
        async with SQLiteStore(db) as store:
            state = await store.load(VICTIM)
            partial = await store.load(VICTIM, queued_limit=3)
            return state

    # All or nothing per batch, and nothing acknowledged lost: the child may have committed one
    # batch more than it lived to print.
    for round_ in kill_rounds(batches, _WRITER, [str(db)], load, rounds=5):
        state, recovered = round_.state, round_.recovered
        assert partial is not None
        assert state.last_seq == recovered * 100 + batch_size(recovered) - 1
        assert partial.last_seq == state.last_seq
        queued = sum(1 for m in state.messages.values() if m.packet_id is None)
        assert partial.queued_not_loaded == max(0, queued - 3)
        with raw(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [(b"ok",)]
    assert recovered >= 4  # every round acknowledged at least one batch


async def test_a_client_id_that_is_not_utf8_is_refused_before_the_database(
    store: SQLiteStore,
) -> None:
    lone_surrogate = "a\ud800"
    calls = [
        store.load(lone_surrogate),
        store.apply(lone_surrogate, [MessageAdded(msg(1))]),
        store.update_ttl(lone_surrogate, 60),
        store.exists(lone_surrogate),
    ]
    for call in calls:
        with pytest.raises(InvalidClientId, match="cannot be stored"):
            await call
    assert await store.list_sessions() == []
