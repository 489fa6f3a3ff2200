"""Format 1 -> 2: every store upgrades data written by the version-1 library.

The data are the fixtures in ``tests/data/format1`` (written by ``make_fixtures.py`` with the
v1 stores; see there): a FileStore journal directory, a SQLite database and a dump of the
Redis keys, each holding the sessions of :data:`make_fixtures.SESSIONS`. Each store must load
them as version 1 replayed them, with ``protocol_version`` 4 (version 1 spoke MQTT 3.1.1 only),
then take format-2 operations and give them back after a reopen.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mqtt_persist.errors import SessionLocked, UnsupportedFormatVersion
from mqtt_persist.session.state import (
    InboundReleased,
    MessageAdded,
    MessageRemoved,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    ProtocolVersionSet,
    SessionState,
    SetAsideMessage,
    StoredMessage,
    SubscriptionSet,
)
from mqtt_persist.stores import FileStore, SessionStore
from mqtt_persist.stores.file import journal as file_journal
from mqtt_persist.stores.sqlite import SQLiteStore
from mqtt_persist.stores.sqlite import schema as sqlite_schema
from tests.data.format1 import make_fixtures as v1
from tests.test_stores import FakeClock

DATA = Path(__file__).parent / "data" / "format1"
#: A little after the fixtures were written: their TTL (an hour) has not run out.
NOW = v1.T0 + 10

#: Format-2 operations applied to ``gateway-1`` after the upgrade.
V2_OPS: list[Operation] = [
    ProtocolVersionSet(5),
    MessageAdded(StoredMessage(9, "v5/t", b"nine", 2, properties=b"\x01\x01", expires_at=NOW)),
    PacketIdAssigned(4, 4),
    MessageSetAside(4, "the broker closed the connection after it 3 times", NOW),
    MessageSetAside(3, "in flight, then set aside", NOW + 1),
    MessageRemoved(2),
    InboundReleased(17),
    SubscriptionSet("v5/#", 1, confirmed=True, options=0x2C, subscription_id=12),
]


def upgraded(client_id: str) -> SessionState:
    """What a format-2 store must load for a format-1 session."""
    state = v1.SESSIONS[client_id].copy()
    state.protocol_version = 4
    return state


def test_the_fixtures_hold_what_the_tests_expect() -> None:
    """The sessions the fixture script describes (not just whatever it replays to)."""
    state = v1.SESSIONS["gateway-1"]
    assert list(state.messages) == [2, 3, 4, 5, 6, 7] and state.last_seq == 8
    assert [(m.packet_id, m.released) for m in state.messages.values()][:3] == [
        (2, True),
        (3, False),
        (None, False),
    ]
    assert state.inbound_qos2 == {17, 19} and state.pending_unsubscribes == {"old/topic"}
    assert {f: s.confirmed for f, s in state.subscriptions.items()} == {
        "sensors/+/temp": True,
        "cmd/#": True,
        "alerts/#": False,
    }
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 40_000


async def check_upgrade(make: Any) -> None:
    """Load every fixture session, apply format-2 operations, reopen: all as replayed."""
    store: SessionStore = make()
    try:
        for client_id in v1.SESSIONS:
            assert await store.load(client_id) == upgraded(client_id)
        infos = {info.client_id: info for info in await store.list_sessions()}
        info = infos["gateway-1"]
        assert (info.created_at, info.last_access) == (v1.T0, NOW)
        assert info.expires_at == NOW + v1.TTL  # the TTL came along
        assert (infos["gateway-1"].inflight, infos["gateway-1"].queued) == (2, 4)
        await store.apply("gateway-1", V2_OPS)
        expected = upgraded("gateway-1")
        expected.apply_all(V2_OPS)
        assert await store.load("gateway-1") == expected
    finally:
        await store.close()
    store = make()
    try:
        state = await store.load("gateway-1")
        assert state == expected
        assert state is not None and state.protocol_version == 5 and state.last_seq == 9
        assert state.set_aside[4] == SetAsideMessage(
            StoredMessage(4, "sensors/b/temp", b"", 2), V2_OPS[3].reason, NOW
        )
        assert state.set_aside[3].message.packet_id is None  # its packet ID 3 is free again
        [info] = [i for i in await store.list_sessions() if i.client_id == "gateway-1"]
        assert (info.inflight, info.queued, info.set_aside) == (0, 4, 2)
        assert await store.load("gateway-ü/2") == upgraded("gateway-ü/2")
    finally:
        await store.close()


# --- FileStore ----------------------------------------------------------------------------------


@pytest.fixture
def journals(tmp_path: Path) -> Path:
    directory = tmp_path / "sessions"
    shutil.copytree(DATA / "file", directory)
    directory.chmod(0o700)
    return directory


def _files(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def _version(path: Path) -> int:
    return int(struct.unpack_from("<H", path.read_bytes(), 4)[0])


async def test_file_store_upgrades_format_1(journals: Path) -> None:
    paths = _files(journals, "*.journal")
    assert [_version(p) for p in paths] == [1, 1]
    before = {p: p.read_bytes() for p in paths}
    # Reading only (listing) upgrades in memory and leaves the files as they are.
    async with FileStore(journals, clock=FakeClock(NOW)) as store:
        infos = {info.client_id: info for info in await store.list_sessions()}
        assert set(infos) == set(v1.SESSIONS)
        assert await store.exists("gateway-1")
    assert {p: p.read_bytes() for p in paths} == before
    await check_upgrade(lambda: FileStore(journals, clock=FakeClock(NOW)))
    assert [_version(p) for p in paths] == [2, 2]  # rewritten by the first load
    assert not _files(journals, "*.corrupt-*")


async def test_file_store_upgrades_a_format_1_journal_with_a_torn_tail(journals: Path) -> None:
    [path] = _files(journals, "gateway-1-*.journal")
    # A crash in the middle of appending a record: its header and half its body.
    path.write_bytes(path.read_bytes() + bytes([0xA5]) + struct.pack("<II", 100, 0) + b"half")
    async with FileStore(journals, clock=FakeClock(NOW)) as store:
        assert await store.load("gateway-1") == upgraded("gateway-1")
    assert _version(path) == 2
    async with FileStore(journals, clock=FakeClock(NOW)) as store:
        assert await store.load("gateway-1") == upgraded("gateway-1")


async def test_file_store_quarantines_a_format_1_journal_with_a_damaged_header(
    journals: Path,
) -> None:
    [path] = _files(journals, "gateway-1-*.journal")
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # created_at: the migration must not give it a fresh checksum
    path.write_bytes(bytes(data))
    async with FileStore(journals, clock=FakeClock(NOW)) as store:
        with pytest.raises(Exception, match="checksum") as info:
            await store.load("gateway-1")
    assert not isinstance(info.value, UnsupportedFormatVersion)
    assert _files(journals, "*.corrupt-*")
    assert file_journal.FORMAT_VERSION == 2


# --- SQLiteStore --------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> Path:
    db = tmp_path / "db" / "sessions.db"
    db.parent.mkdir(mode=0o700)
    shutil.copyfile(DATA / "sessions.db", db)
    db.chmod(0o600)
    return db


def _user_version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


async def test_sqlite_store_upgrades_format_1(database: Path) -> None:
    assert _user_version(database) == 1
    await check_upgrade(lambda: SQLiteStore(database, clock=FakeClock(NOW)))
    assert _user_version(database) == 2


async def test_sqlite_upgrade_is_one_transaction(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that fails half way leaves the version-1 database exactly as it was."""
    migrate = sqlite_schema.MIGRATIONS[1]

    def fails_after_the_work(conn: sqlite3.Connection) -> None:
        migrate(conn)
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setitem(sqlite_schema.MIGRATIONS, 1, fails_after_the_work)
    store = SQLiteStore(database, clock=FakeClock(NOW))
    with pytest.raises(Exception, match="simulated"):
        await store.open()
    await store.close()
    assert _user_version(database) == 1
    conn = sqlite3.connect(database)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    finally:
        conn.close()
    assert "set_aside" not in tables and "properties" not in columns
    monkeypatch.setitem(sqlite_schema.MIGRATIONS, 1, migrate)
    await check_upgrade(lambda: SQLiteStore(database, clock=FakeClock(NOW)))


# --- RedisStore ---------------------------------------------------------------------------------


@pytest.fixture
async def redis_url(tmp_path: Path) -> AsyncIterator[str]:
    """A redis-server of this test's own, holding the format-1 keys of the fixture dump."""
    pytest.importorskip("redis", reason="redis-py not installed (pip install mqtt-persist[redis])")
    from redis.asyncio import Redis

    from tests.support.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        client = Redis.from_url(server.url, decode_responses=False)
        try:
            dump = json.loads((DATA / "redis.json").read_text(encoding="ascii"))
            for name, entry in dump.items():
                await _restore(client, name.encode("latin-1"), entry)
        finally:
            await client.aclose()
        yield server.url


async def _restore(client: Any, key: bytes, entry: dict[str, Any]) -> None:
    def raw(text: str) -> bytes:
        return text.encode("latin-1")

    kind, value = entry["type"], entry["value"]
    if kind == "string":
        await client.set(key, raw(value))
    elif kind == "hash":
        await client.hset(key, mapping={raw(k): raw(v) for k, v in value.items()})
    elif kind == "set":
        await client.sadd(key, *(raw(m) for m in value))
    elif kind == "zset":
        await client.zadd(key, {raw(m): score for m, score in value})
    else:
        raise AssertionError(f"{key!r}: {kind}")
    if entry["pttl"] > 0:
        await client.pexpire(key, entry["pttl"])


def _redis_store(url: str) -> Any:
    from mqtt_persist.stores.redis import RedisStore

    return RedisStore(url, prefix=v1.PREFIX, clock=FakeClock(NOW))


async def test_redis_store_upgrades_format_1(redis_url: str) -> None:
    from redis.asyncio import Redis

    raw = Redis.from_url(redis_url, decode_responses=False)
    try:
        meta = {cid: f"{v1.PREFIX}:s:{cid}:meta".encode() for cid in v1.SESSIONS}
        assert await raw.get(f"{v1.PREFIX}:format") == b"1"
        store = _redis_store(redis_url)
        try:
            # Opening raises the prefix's version; sessions are upgraded one by one, when used.
            await store.open()
            assert await raw.get(f"{v1.PREFIX}:format") == b"2"
            assert {i.client_id for i in await store.list_sessions()} == set(v1.SESSIONS)
            assert await store.load("gateway-1") == upgraded("gateway-1")
            assert await raw.hmget(meta["gateway-1"], ["v", "protocol"]) == [b"2", b"4"]
            assert await raw.hmget(meta["gateway-ü/2"], ["v", "protocol"]) == [b"1", None]
        finally:
            await store.close()
        await check_upgrade(lambda: _redis_store(redis_url))
        assert await raw.hmget(meta["gateway-ü/2"], ["v", "protocol"]) == [b"2", b"4"]
    finally:
        await raw.aclose()


async def test_redis_migration_respects_the_lease(redis_url: str) -> None:
    """A session another owner holds is not upgraded under it."""
    from redis.asyncio import Redis

    holder, other = _redis_store(redis_url), _redis_store(redis_url)
    raw = Redis.from_url(redis_url, decode_responses=False)
    try:
        await holder.acquire("gateway-1")
        with pytest.raises(SessionLocked):
            await other.load("gateway-1")
        # Nor by the migration script itself, should the lease change hands in between.
        await other.open()
        keys = other._keys("gateway-1")
        args = [b"", b"%r" % NOW, 2, b"gateway-1"]
        reply = await other._scripts.migrate_1(keys=keys.script, args=args)
        assert reply[0] == b"locked"
        assert await raw.hget(f"{v1.PREFIX}:s:gateway-1:meta", "v") == b"1"
        assert await holder.load("gateway-1") == upgraded("gateway-1")
    finally:
        await holder.close()
        await other.close()
        await raw.aclose()
