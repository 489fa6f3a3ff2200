"""PostgresStore beyond the conformance suite: damage and quarantine, format versions, the
DSN's password, atomic batches, long queues, expiry cleanup and leases, SIGKILL.

Runs against the machine's PostgreSQL (tests/support/postgres.py): one database per test
session, one schema per test.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mqtt_persist.errors import (
    InvalidClientId,
    SessionCorrupt,
    SessionFenced,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageRemoved,
    Operation,
    PacketIdAssigned,
    SessionState,
    SubscriptionSet,
)
from tests.support.postgres import shared_postgres_dsn, unique_schema
from tests.support.store_kill import VICTIM, Batches, kill_rounds
from tests.test_stores import T0, FakeClock, msg

psycopg = pytest.importorskip("psycopg", reason="pip install mqtt-persist[postgres]")

from psycopg import sql  # noqa: E402

from mqtt_persist.stores.postgres import FORMAT_VERSION, PostgresStore  # noqa: E402
from mqtt_persist.stores.postgres import connection as pg_connection  # noqa: E402
from mqtt_persist.stores.postgres import operations as pg_operations  # noqa: E402
from mqtt_persist.stores.postgres import schema as pg_schema  # noqa: E402


@pytest.fixture
def dsn() -> str:
    return shared_postgres_dsn()


@pytest.fixture
def schema(tmp_path: Path) -> str:
    return unique_schema(tmp_path)


@pytest.fixture
async def store(dsn: str, schema: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(dsn, schema=schema, clock=FakeClock()) as store:
        yield store


@pytest.fixture
def raw(dsn: str, schema: str) -> Any:
    """A plain connection, for damage done behind the store's back; ``raw.x(sql)`` runs
    ``sql`` with ``{s}`` standing for the schema and returns the rows."""
    conn = psycopg.connect(dsn, autocommit=True)

    def x(text: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cursor = conn.execute(sql.SQL(text).format(s=sql.Identifier(schema)), params)
        return cursor.fetchall() if cursor.description else []

    conn.x = x
    yield conn
    conn.close()


# --- damage ---------------------------------------------------------------------------------------

_C = "client_id = 'c'"
DAMAGE = {
    "qos 7": f"UPDATE {{s}}.messages SET qos = 7 WHERE {_C} AND seq = 2",
    "topic not UTF-8": f"UPDATE {{s}}.messages SET topic = '\\xff'::bytea WHERE {_C} AND seq = 1",
    "payload NULL": f"UPDATE {{s}}.messages SET payload = NULL WHERE {_C} AND seq = 1",
    "packet id out of range": f"UPDATE {{s}}.messages SET packet_id = 70000 WHERE {_C} AND seq = 2",
    "created_at NaN": f"UPDATE {{s}}.sessions SET created_at = 'NaN' WHERE {_C}",
    "protocol 3": f"UPDATE {{s}}.sessions SET protocol_version = 3 WHERE {_C}",
    "subscription options": f"UPDATE {{s}}.subscriptions SET options = 255 WHERE {_C}",
    "inbound packet id": f"UPDATE {{s}}.inbound SET packet_id = -1 WHERE {_C}",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_damaged_rows_are_quarantined_never_deleted(
    store: PostgresStore, raw: Any, damage: str
) -> None:
    ops: list[Operation] = [MessageAdded(msg(1)), MessageAdded(msg(2)), PacketIdAssigned(2, 9)]
    await store.apply("c", [*ops, SubscriptionSet("a/#", 1), InboundReceived(3)])
    await store.apply("other", [MessageAdded(msg(1))])
    raw.x(DAMAGE[damage])
    with pytest.raises(SessionCorrupt) as info:
        await store.load("c")
    assert info.value.quarantined_to is not None and "qid" in info.value.quarantined_to
    assert schema_name(store) in info.value.location
    # Moved, not deleted: the rows, damage included, are in the quarantine tables.
    [(qid, reason, client_id)] = raw.x("SELECT qid, reason, client_id FROM {s}.quarantine")
    assert bytes(client_id) == b"c" and reason in str(info.value)
    assert raw.x("SELECT count(*) FROM {s}.quarantine_messages WHERE qid = %s", (qid,)) == [(2,)]
    assert raw.x("SELECT count(*) FROM {s}.quarantine_subscriptions") == [(1,)]
    assert raw.x("SELECT count(*) FROM {s}.quarantine_inbound") == [(1,)]
    assert raw.x("SELECT count(*) FROM {s}.messages WHERE client_id = 'c'") == [(0,)]
    assert await store.load("c") is None  # the next start begins anew
    assert await store.load("other") is not None  # other sessions are untouched
    await store.apply("c", [MessageAdded(msg(5))])
    state = await store.load("c")
    assert state is not None and list(state.messages) == [5]


def schema_name(store: PostgresStore) -> str:
    return store.schema


async def test_damage_found_by_read_queued_is_quarantined(store: PostgresStore, raw: Any) -> None:
    await store.apply("c", [MessageAdded(msg(s)) for s in range(1, 6)])
    raw.x("UPDATE {s}.messages SET qos = 9 WHERE seq = 4")
    assert [m.seq for m in await store.read_queued("c", 0, 3)] == [1, 2, 3]
    with pytest.raises(SessionCorrupt) as info:
        await store.read_queued("c", 3, 3)
    assert info.value.quarantined_to is not None
    assert raw.x("SELECT count(*) FROM {s}.quarantine_messages") == [(5,)]


async def test_damaged_sessions_exist_but_are_not_listed(
    store: PostgresStore, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await store.apply("bad", [MessageAdded(msg(1))])
    await store.apply("good", [MessageAdded(msg(1))])
    raw.x("UPDATE {s}.sessions SET last_access = 'Infinity' WHERE client_id = 'bad'")
    assert await store.exists("bad")  # load reports it
    assert [info.client_id for info in await store.list_sessions()] == ["good"]
    assert "skipping damaged session" in caplog.text
    await store.update_ttl("bad", 5)  # quarantines it, and starts a new, empty one
    assert raw.x("SELECT count(*) FROM {s}.quarantine") == [(1,)]


# --- format versions ------------------------------------------------------------------------------


async def test_a_newer_format_is_refused_and_left_in_place(dsn: str, schema: str, raw: Any) -> None:
    async with PostgresStore(dsn, schema=schema) as store:
        await store.apply("c", [MessageAdded(msg(1))])
    raw.x("UPDATE {s}.store_format SET version = %s", (FORMAT_VERSION + 1,))
    with pytest.raises(UnsupportedFormatVersion, match="newer"):
        await PostgresStore(dsn, schema=schema).open()
    assert raw.x("SELECT count(*) FROM {s}.messages") == [(1,)]
    assert raw.x("SELECT version FROM {s}.store_format") == [(FORMAT_VERSION + 1,)]


async def test_older_formats_are_upgraded_by_the_migrations(
    dsn: str, schema: str, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore(dsn, schema=schema) as store:
        await store.apply("c", [MessageAdded(msg(1))])
    raw.x("UPDATE {s}.store_format SET version = %s", (FORMAT_VERSION - 1,))
    calls: list[str] = []

    async def migrate(conn: Any, name: str) -> None:
        calls.append(name)
        await conn.execute(sql.SQL("ALTER TABLE {}.sessions ADD COLUMN note text").format(
            sql.Identifier(name)))  # fmt: skip

    monkeypatch.setitem(pg_schema.MIGRATIONS, FORMAT_VERSION - 1, migrate)
    async with PostgresStore(dsn, schema=schema) as store:
        assert calls == [schema]
        state = await store.load("c")
        assert state is not None and list(state.messages) == [1]
    assert raw.x("SELECT version FROM {s}.store_format") == [(FORMAT_VERSION,)]
    # A version nothing upgrades from is refused, and left as it is.
    monkeypatch.delitem(pg_schema.MIGRATIONS, FORMAT_VERSION - 1)
    raw.x("UPDATE {s}.store_format SET version = 0")
    with pytest.raises(StoreError, match="cannot upgrade"):
        await PostgresStore(dsn, schema=schema).open()


async def test_a_schema_of_other_tables_is_refused(dsn: str, schema: str, raw: Any) -> None:
    raw.x("CREATE SCHEMA {s}")
    raw.x("CREATE TABLE {s}.customers (id int)")
    with pytest.raises(StoreError, match="not a PostgresStore"):
        await PostgresStore(dsn, schema=schema).open()
    assert raw.x("SELECT count(*) FROM {s}.customers") == [(0,)]


# --- credentials ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn_with_password",
    [
        "postgresql://user:s3cret@127.0.0.1:1/db",
        "host=127.0.0.1 port=1 user=user password=s3cret dbname=db",
    ],
)
async def test_the_password_never_shows(
    dsn_with_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = PostgresStore(dsn_with_password, connect_timeout=5)
    assert "s3cret" not in repr(store) and "s3cret" not in store.dsn
    assert "***" in store.dsn
    with pytest.raises(StoreError) as info:
        await store.load("a")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in caplog.text
    await store.close()


# --- atomic batches, long queues ------------------------------------------------------------------


async def test_a_batch_that_fails_half_way_leaves_nothing(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.apply("c", [MessageAdded(msg(1))])

    def broken(schema: str, cid: bytes, ops: list[Any]) -> list[Any]:
        return [(b"SELECT 1/0", ())]

    monkeypatch.setitem(pg_operations.HANDLERS, MessageRemoved, broken)
    with pytest.raises(StoreError, match="division by zero"):
        await store.apply("c", [MessageAdded(msg(2)), PacketIdAssigned(1, 4), MessageRemoved(1)])
    state = await store.load("c")
    assert state is not None and state.messages == {1: msg(1)}  # none of the batch


async def test_a_long_queue_is_read_back_in_pages(store: PostgresStore) -> None:
    n = 20_000
    await store.apply("c", [MessageAdded(msg(s, payload=b"p")) for s in range(1, n + 1)])
    await store.apply("c", [PacketIdAssigned(s, s) for s in range(1, 11)])
    state = await store.load("c", queued_limit=100)
    assert state is not None and len(state.messages) == 110
    assert state.queued_not_loaded == n - 110 and state.last_seq == n
    after, seen = 110, 110
    while page := await store.read_queued("c", after, 5000):
        assert [m.seq for m in page] == list(range(after + 1, after + 1 + len(page)))
        after, seen = page[-1].seq, seen + len(page)
    assert seen == n
    [info] = await store.list_sessions()
    assert (info.inflight, info.queued) == (10, n - 10)


# --- expiry and leases ----------------------------------------------------------------------------


async def test_cleanup_fences_a_lapsed_owner_of_an_expired_session(dsn: str, schema: str) -> None:
    clock = FakeClock()
    owner = PostgresStore(dsn, schema=schema, clock=clock, lease_ttl=0.3)
    janitor = PostgresStore(dsn, schema=schema, clock=clock)
    try:
        await owner.acquire("c")
        await owner.apply("c", [MessageAdded(msg(1))])
        await owner.update_ttl("c", 10)
        await owner._leases.stop_renewal()  # the owner stalls; its lease lapses
        clock.advance(11)
        await _until_lapsed(janitor)
        assert await janitor.cleanup_expired() == 1
        with pytest.raises(SessionFenced):  # it must not write into a session now gone
            await owner.apply("c", [MessageAdded(msg(2))])
        assert await janitor.load("c") is None
    finally:
        await owner.close()
        await janitor.close()


async def _until_lapsed(store: PostgresStore) -> None:
    """Until every lease in the store's schema lapsed, by the server's clock."""
    query = sql.SQL(
        "SELECT coalesce(bool_and(expires_at <= clock_timestamp()), true) FROM {}.leases"
    ).format(sql.Identifier(store.schema))
    for _ in range(200):
        async with store._connection() as conn:
            row = await (await conn.execute(query)).fetchone()
        if row is not None and row[0]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the lease never lapsed")


async def test_an_acquire_cancelled_while_its_takeover_waits_for_a_lock_leaves_no_lease(
    dsn: str, schema: str, raw: Any
) -> None:
    """The former owner's lease lapsed, but a transaction of it still holds the lease row: a
    takeover's statement waits for that lock on the server. Cancelled then by anyio (which
    cancels again and again, so psycopg closes the connection instead of cancelling the
    query), the statement still runs once the lock goes. The acquire's undo waits for it
    too, and removes what it wrote: another store takes the session at once."""
    former = PostgresStore(dsn, schema=schema, lease_ttl=0.3)
    cancelled = PostgresStore(dsn, schema=schema, lease_ttl=60.0)
    other = PostgresStore(dsn, schema=schema, lease_ttl=60.0)
    try:
        await former.acquire("c")
        await former._leases.stop_renewal()
        await _until_lapsed(other)
        raw.execute("BEGIN")
        raw.x("SELECT 1 FROM {s}.leases WHERE client_id = 'c' FOR SHARE")
        # The lock goes while the cancelled acquire's undo runs (bounded at 2 s).
        asyncio.get_running_loop().call_later(0.6, raw.execute, "COMMIT")
        with anyio.move_on_after(0.3) as scope:
            await cancelled.acquire("c")
        assert scope.cancelled_caught
        assert cancelled.fencing_token("c") is None
        await asyncio.sleep(0.5)  # the lock is gone: the statement has run if it was to
        await other.acquire("c")  # SessionLocked (for 60 s) before the undo waited
    finally:
        for store in (former, cancelled, other):
            await store.close()


async def test_a_cancellation_as_a_connection_opens_is_not_lost(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller is cancelled just as connecting ends. Python 3.11's asyncio.wait_for, which
    the pool wrapped around connecting, then returned the connection and dropped the
    cancellation: the call went on, and a caller's asyncio.timeout never fired."""
    pool = pg_connection.Pool(dsn, 1, idle_timeout_ms=10_000, connect_timeout=10.0)
    caller = asyncio.current_task()
    assert caller is not None
    connect = pg_connection.AsyncConnection.connect

    async def connect_then_cancel(*args: Any, **kwargs: Any) -> Any:
        conn = await connect(*args, **kwargs)
        caller.cancel()
        return conn

    monkeypatch.setattr(pg_connection.AsyncConnection, "connect", connect_then_cancel)
    try:
        with pytest.raises(asyncio.CancelledError):
            async with pool.connection():
                pass
        assert caller.uncancel() == 0
        assert pool._open == 0  # the connection was closed, not kept
    finally:
        await pool.close()


async def test_save_keeps_created_at_ttl_and_a_growing_last_seq(dsn: str, schema: str) -> None:
    clock = FakeClock()
    async with PostgresStore(dsn, schema=schema, clock=clock) as store:
        await store.apply("a", [MessageAdded(msg(1)), MessageAdded(msg(50))])
        await store.update_ttl("a", 100)
        clock.advance(10)
        snapshot = SessionState("a")
        snapshot.apply_all([MessageAdded(msg(2, packet_id=4)), InboundReceived(3)])
        await store.save(snapshot)
        state = await store.load("a")
        assert state == snapshot
        assert state is not None and state.last_seq == 50
        [info] = await store.list_sessions()
        assert (info.created_at, info.last_access, info.expires_at) == (T0, T0 + 10, T0 + 110)


# --- SIGKILL --------------------------------------------------------------------------------------

_BATCHES = textwrap.dedent(
    """
    import random
    from mqtt_persist.session.state import (
        InboundReceived, InboundReleased, MessageAdded, MessageReleased, MessageRemoved,
        MessageRequeued, PacketIdAssigned, StoredMessage, SubscriptionSet,
    )

    def make_batch(n):
        rng = random.Random(n)
        ops = [MessageAdded(StoredMessage(n * 100 + i, f"t/{n}", rng.randbytes(50), 1 + i % 2))
               for i in range(rng.randint(1, 30))]
        if n >= 1:
            ops += [PacketIdAssigned((n - 1) * 100, n % 65535 + 1), MessageReleased((n - 1) * 100)]
        if n >= 2:
            ops += [MessageRequeued((n - 2) * 100), MessageRemoved((n - 2) * 100 + 1)]
        ops += [InboundReceived(n % 65535 + 1), SubscriptionSet(f"s/{n % 7}", n % 3)]
        if n >= 2:
            ops.append(InboundReleased((n - 2) % 65535 + 1))
        return ops
    """
)

_WRITER = textwrap.dedent(
    """
    from mqtt_persist.stores.postgres import PostgresStore
    from tests.support.store_kill import write_batches

    write_batches(lambda args: PostgresStore(args[0], schema=args[1]), make_batch)
    """
)


def test_sigkill_loses_nothing_acknowledged(dsn: str, schema: str) -> None:
    batches = Batches(_BATCHES)

    async def recover() -> SessionState | None:
        # The killed writer still "holds" the lease: same host, dead pid, so it is taken over.
        async with PostgresStore(dsn, schema=schema) as store:
            await store.acquire(VICTIM)
            return await store.load(VICTIM)

    for round_ in kill_rounds(batches, _WRITER, [dsn, schema], recover, rounds=4, max_delay=0.3):
        assert round_.state is not None


def test_a_burst_becomes_as_few_runs_as_its_order_allows() -> None:
    """100 publishes interleave MessageAdded and PacketIdAssigned: two statements, not 200;
    an operation never moves ahead of another type's operation on the same key."""
    burst: list[Operation] = []
    for s in range(100):
        burst += [MessageAdded(msg(s)), PacketIdAssigned(s, s + 1)]
    assert [(t.__name__, len(ops)) for t, ops in pg_operations.plan_runs(burst)] == [
        ("MessageAdded", 100),
        ("PacketIdAssigned", 100),
    ]
    ordered: list[Operation] = [
        MessageAdded(msg(1)),
        MessageRemoved(1),
        MessageAdded(msg(1)),  # after the removal of the same seq: a run of its own
        MessageAdded(msg(2)),
        InboundReceived(5),
        MessageRemoved(2),
    ]
    runs = [(t.__name__, [_seq(op) for op in ops]) for t, ops in pg_operations.plan_runs(ordered)]
    assert runs == [
        ("MessageAdded", [1]),
        ("MessageRemoved", [1]),
        ("MessageAdded", [1, 2]),  # the re-added 1 after its removal; 2 joins it
        ("InboundReceived", [None]),
        ("MessageRemoved", [2]),  # after the run that added 2
    ]


def _seq(op: Any) -> int | None:
    if isinstance(op, MessageAdded):
        return op.message.seq
    return getattr(op, "seq", None)


async def test_applies_of_several_sessions_share_a_transaction(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit across sessions; a fenced session's write fails alone, the others commit."""
    async with (
        PostgresStore(dsn, schema=schema) as store,
        PostgresStore(dsn, schema=schema) as rival,
    ):
        for client_id in ("a", "b", "c"):
            await store.acquire(client_id)
        await rival.acquire("a", takeover=True)
        transactions: list[int] = []
        commit = store._commit_applies

        async def counting(applies: Any) -> None:
            transactions.append(len(applies))
            await commit(applies)

        monkeypatch.setattr(store._group, "_run", counting)
        results = await asyncio.gather(
            *(store.apply(c, [MessageAdded(msg(1))]) for c in ("a", "b", "c")),
            return_exceptions=True,
        )
        assert isinstance(results[0], SessionFenced) and results[1:] == [None, None]
        # One transaction for the three, which failed (a's check); then each alone.
        assert transactions == [3, 1, 1, 1]
        for client_id in ("b", "c"):
            state = await store.load(client_id)
            assert state is not None and list(state.messages) == [1]
        assert await rival.load("a") is None  # nothing of the fenced write
        await asyncio.gather(*(store.apply(c, [MessageAdded(msg(2))]) for c in ("b", "c")))
        assert transactions[-1] == 2  # together, and it went through


async def test_a_client_id_that_is_not_utf8_is_refused_before_the_database(
    store: PostgresStore,
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
