"""Write the format-1 fixtures: sessions stored by the library version that wrote format 1.

The migration tests (``tests/test_store_migration.py``) load these files with the current
library and check that every store upgrades them. They must be written by a checkout whose
stores still write format version 1 (the last is commit ``db8028f``), never by the current code,
so this script refuses to run when any store's ``FORMAT_VERSION`` is not 1. To write them again::

    mkdir /tmp/v1 && git archive db8028f | tar -x -C /tmp/v1
    cd /tmp/v1 && PYTHONPATH=. /path/to/.venv/bin/python \
        /path/to/tests/data/format1/make_fixtures.py /path/to/tests/data/format1

(``PYTHONPATH=.``: the ``mqtt_persist`` and ``tests.support`` imported are those of the v1
tree, not the ones the virtual environment installed). It needs ``redis-server`` (a private
one is started on a free 127.0.0.1 port) and writes:

``file/*.journal``
    FileStore journals (lock files are not kept).
``sessions.db``
    the SQLiteStore database, then rewritten with 512-byte pages and the rollback journal
    (``VACUUM``), so that sixteen tables take a few KB; rows and schema are untouched.
``redis.json``
    every key under the prefix ``fixture`` after the store closed: ``{key: {"type", "pttl",
    "value"}}`` (``pttl`` rounded up to whole seconds, so that writing the dump again gives the
    same file), with every byte string written as the str that ``bytes.decode("latin-1")``
    gives (lossless, and readable where it is ASCII); a hash is an object, a set a sorted list,
    a zset a list of ``[member, score]``.

Every store holds the same two sessions (:data:`SESSIONS`), written at the fixed time
:data:`T0`: ``gateway-1`` through ``apply`` batches (queued messages, in-flight ones of which one
QoS 2 message is released, inbound QoS 2 packet IDs, confirmed and unconfirmed subscriptions, a
pending unsubscribe, a removed highest sequence number, a TTL) and ``gateway-ü/2`` through
``save``. The tests import :data:`SESSIONS` to know what the files hold.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from mqtt_persist.session.state import (
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    Operation,
    PacketIdAssigned,
    SessionState,
    StoredMessage,
    SubscriptionRemoved,
    SubscriptionSet,
)

#: The time every fixture was written at (store clocks are frozen there).
T0 = 1_700_000_000.0
#: The TTL of ``gateway-1`` (seconds after its last access).
TTL = 3600.0
#: The Redis key prefix of the fixtures.
PREFIX = "fixture"

#: ``gateway-1``: the batches applied, in order.
BATCHES: list[list[Operation]] = [
    [
        MessageAdded(StoredMessage(1, "sensors/a/temp", b"21.5", 1)),
        MessageAdded(StoredMessage(2, "cmd/ack", b"\x00\x01\xfe\xff", 2, retain=True)),
        MessageAdded(StoredMessage(3, "ü/🚀", "grüße".encode(), 1)),
        MessageAdded(StoredMessage(4, "sensors/b/temp", b"", 2)),
        MessageAdded(StoredMessage(5, "log", b"x" * 200, 1)),
        SubscriptionSet("sensors/+/temp", 1),
        SubscriptionSet("cmd/#", 2),
        SubscriptionSet("old/topic", 0),
    ],
    [
        PacketIdAssigned(1, 1),
        PacketIdAssigned(2, 2),
        PacketIdAssigned(3, 3),
        MessageReleased(2),
        SubscriptionSet("sensors/+/temp", 1, confirmed=True),
        SubscriptionSet("cmd/#", 2, confirmed=True),
        InboundReceived(17),
        InboundReceived(18),
        InboundReceived(19),
    ],
    [
        MessageRemoved(1),
        InboundReleased(18),
        SubscriptionRemoved("old/topic", unsubscribe_pending=True),
        SubscriptionSet("alerts/#", 1),
        MessageAdded(StoredMessage(6, "log", b"six", 2)),
        MessageAdded(StoredMessage(7, "log", b"seven", 1)),
        MessageAdded(StoredMessage(8, "log", b"eight", 1)),
    ],
    [MessageRemoved(8)],  # the highest number goes, and must still never be handed out again
]


def _snapshot() -> SessionState:
    state = SessionState("gateway-ü/2")
    state.apply_all(
        [
            MessageAdded(StoredMessage(10, "a/b", b"queued", 1)),
            MessageAdded(StoredMessage(11, "a/c", b"in flight", 2, packet_id=40, released=True)),
            InboundReceived(5),
            SubscriptionSet("a/#", 2, confirmed=True),
        ]
    )
    return state


#: What each store holds, as format 1 replays it: client id -> state.
SESSIONS: dict[str, SessionState] = {"gateway-ü/2": _snapshot()}
_state = SessionState("gateway-1")
for _batch in BATCHES:
    _state.apply_all(_batch)
SESSIONS["gateway-1"] = _state


async def _write(store: Any) -> None:
    async with store:
        for batch in BATCHES:
            await store.apply("gateway-1", batch)
        await store.update_ttl("gateway-1", TTL)
        await store.save(SESSIONS["gateway-ü/2"])
        for client_id, expected in SESSIONS.items():
            loaded = await store.load(client_id)
            assert loaded == expected, (client_id, loaded, expected)


def _check_versions() -> None:
    from mqtt_persist.stores import file, sqlite
    from mqtt_persist.stores.redis import server

    versions = {
        "file": file.FORMAT_VERSION,
        "sqlite": sqlite.FORMAT_VERSION,
        "redis": server.FORMAT_VERSION,
    }
    if set(versions.values()) != {1}:
        sys.exit(f"these stores do not write format 1: {versions}; run this in a v1 checkout")


def write_file(out: Path) -> None:
    from mqtt_persist.stores.file import FileStore

    with tempfile.TemporaryDirectory() as work:
        asyncio.run(_write(FileStore(Path(work) / "s", clock=lambda: T0)))
        target = out / "file"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for journal in sorted((Path(work) / "s").glob("*.journal")):
            shutil.copyfile(journal, target / journal.name)


def write_sqlite(out: Path) -> None:
    from mqtt_persist.stores.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory() as work:
        db = Path(work) / "sessions.db"
        asyncio.run(_write(SQLiteStore(db, clock=lambda: T0)))
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA page_size = 512")
        conn.execute("VACUUM")
        conn.close()
        shutil.copyfile(db, out / "sessions.db")


def _text(value: bytes) -> str:
    return value.decode("latin-1")


async def _dump(url: str) -> dict[str, Any]:
    from redis.asyncio import Redis

    client = Redis.from_url(url, decode_responses=False)
    dump: dict[str, Any] = {}
    try:
        for key in sorted(await client.keys(PREFIX + ":*")):
            kind = (await client.type(key)).decode()
            value: Any
            if kind == "string":
                value = _text(await client.get(key))
            elif kind == "hash":
                raw = await client.hgetall(key)
                value = {_text(k): _text(v) for k, v in sorted(raw.items())}
            elif kind == "set":
                value = sorted(_text(m) for m in await client.smembers(key))
            elif kind == "zset":
                pairs = await client.zrange(key, 0, -1, withscores=True)
                value = [[_text(m), score] for m, score in pairs]
            else:
                raise TypeError(f"{key!r}: a {kind} key is not part of format 1")
            pttl = await client.pttl(key)
            if pttl > 0:
                pttl = -(-pttl // 1000) * 1000
            dump[_text(key)] = {"type": kind, "pttl": pttl, "value": value}
    finally:
        await client.aclose()
    return dump


def write_redis(out: Path) -> None:
    from mqtt_persist.stores.redis import RedisStore
    from tests.support.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as work, RedisServer(Path(work)) as server:
        asyncio.run(_write(RedisStore(server.url, prefix=PREFIX, clock=lambda: T0)))
        dump = asyncio.run(_dump(server.url))
    text = json.dumps(dump, indent=1, ensure_ascii=True, sort_keys=True)
    (out / "redis.json").write_text(text + "\n", encoding="ascii")


def main() -> None:
    """Write every fixture into the directory given as the only argument."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTPUT_DIRECTORY")
    _check_versions()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write_file(out)
    write_sqlite(out)
    write_redis(out)


if __name__ == "__main__":
    main()
