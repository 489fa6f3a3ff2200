"""RedisStore beyond the conformance suite: atomicity, range reads, Redis expiry, damage, leases.

Every test uses the redis-server this test session starts (tests.support.redis_server), under
a key prefix of its own; nothing here touches a redis the machine already runs.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis", reason="redis-py not installed (pip install mqtt-persist[redis])")

from redis.asyncio import Redis

from mqtt_persist.errors import (
    InvalidInput,
    SessionCorrupt,
    SessionExpired,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import (
    InboundReceived,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    MessageSetAside,
    Operation,
    PacketIdAssigned,
    SessionState,
    StoredMessage,
    SubscriptionSet,
)
from mqtt_persist.stores import _owners as redis_owners
from mqtt_persist.stores import _quarantine as quarantine_module
from mqtt_persist.stores import redis as redis_module
from mqtt_persist.stores.redis import RedisStore
from mqtt_persist.stores.redis import codec as redis_codec
from mqtt_persist.stores.redis import scripts as redis_scripts
from mqtt_persist.stores.redis import server as redis_server_module
from mqtt_persist.stores.redis import store as redis_store_module
from mqtt_persist.stores.serialization import EncodeError, encode_operation
from tests.support.redis_server import shared_redis_url, unique_prefix
from tests.support.store_kill import (
    VICTIM,
    Batches,
    child_env,
    kill_rounds,
    start_holder,
    stop_holder,
)
from tests.test_stores import T0, FakeClock, msg


@pytest.fixture
def url() -> str:
    return shared_redis_url()


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    return unique_prefix(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def raw(url: str) -> AsyncIterator[Redis]:
    """A plain client to look at (and damage) what the store wrote."""
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make(url: str, prefix: str, clock: FakeClock) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make(**kwargs)``: an opened-on-use RedisStore under this test's prefix, closed after."""
    stores: list[RedisStore] = []

    def build(**kwargs: Any) -> RedisStore:
        kwargs.setdefault("prefix", prefix)
        kwargs.setdefault("clock", clock)
        store = RedisStore(url, **kwargs)
        stores.append(store)
        return store

    try:
        yield build
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
async def store(make: Callable[..., RedisStore]) -> RedisStore:
    store = make()
    await store.open()
    return store


async def session_keys_present(raw: Redis, store: RedisStore, client_id: str) -> list[str]:
    keys = store.session_keys(client_id)
    return [name for name, key in keys.items() if name != "lease" and await raw.exists(key)]


async def quarantined(raw: Redis, prefix: str) -> list[bytes]:
    # A scan is fine in a test; the store itself never scans.
    return sorted([key async for key in raw.scan_iter(match=f"{prefix}:quarantine:*")])


# --- redis-py is optional -------------------------------------------------------------------------


def test_missing_redis_py_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.delitem(sys.modules, "mqtt_persist.stores.redis")
    with pytest.raises(ImportError) as info:
        importlib.import_module("mqtt_persist.stores.redis")
    assert str(info.value) == "RedisStore needs redis-py: pip install mqtt-persist[redis]"
    assert isinstance(info.value, StoreError)
    stores = importlib.import_module("mqtt_persist.stores")
    with pytest.raises(StoreError, match=r"pip install mqtt-persist\[redis\]"):
        _ = stores.RedisStore
    with pytest.raises(AttributeError):
        _ = stores.NoSuchStore


def test_import_mqtt_persist_does_not_import_redis() -> None:
    code = textwrap.dedent(
        """
        import sys
        import mqtt_persist, mqtt_persist.stores
        assert "redis" not in sys.modules, "import mqtt_persist imported redis-py"
        from mqtt_persist.stores import RedisStore
        assert RedisStore.__module__ == "mqtt_persist.stores.redis"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), timeout=60)


# --- what each operation does ---------------------------------------------------------------------


def test_apply_lua_has_one_branch_per_operation_rule() -> None:
    """apply.lua dispatches on the codes of codec.RULES: one branch each, naming its type."""
    source = redis_scripts.source("apply")
    branches = re.findall(r"\b(?:if|elseif) op == '(.)' then -- (\w+)\n", source)
    expected = [(rule.code.decode(), kind.__name__) for kind, rule in redis_codec.RULES.items()]
    assert sorted(branches) == sorted(expected)
    assert source.count("op == '") == len(expected)  # and no other branch


# --- atomicity ------------------------------------------------------------------------------------


async def test_every_apply_is_one_script_call(store: RedisStore, raw: Redis) -> None:
    await store.apply("a", [MessageAdded(msg(0))])  # loads the script into Redis
    # Connected before MONITOR starts, so its handshake is not among the commands counted.
    marker = Redis.from_url(shared_redis_url())
    await marker.ping()
    batches: list[list[Operation]] = [
        [MessageAdded(msg(1))],
        [MessageAdded(msg(s)) for s in range(2, 102)],
        [PacketIdAssigned(s, s) for s in range(1, 50)] + [MessageRemoved(3), InboundReceived(9)],
        [SubscriptionSet("a/#", 1), MessageReleased(1), MessageRequeued(2)],
    ]
    commands: list[dict[str, Any]] = []
    async with raw.monitor() as monitor:

        async def watch() -> None:
            while True:
                command = await monitor.next_command()
                if "mark-end" in command["command"]:
                    return
                commands.append(dict(command))

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.05)
        for batch in batches:
            await store.apply("a", batch)
        await marker.echo("mark-end")
        await marker.aclose()
        await asyncio.wait_for(watcher, 10)
    from_clients = [c["command"].split()[0].upper() for c in commands if c["client_type"] != "lua"]
    assert from_clients == ["EVALSHA"] * len(batches)
    inside = [c for c in commands if c["client_type"] == "lua"]
    assert len(inside) > 100  # the work happened inside the scripts


async def test_a_batch_that_cannot_be_encoded_changes_nothing(store: RedisStore) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    before = await store.load("a")
    with pytest.raises(EncodeError):
        await store.apply("a", [MessageAdded(msg(2)), PacketIdAssigned(1, 70000)])
    with pytest.raises(EncodeError):  # one error type in every store (was TypeError here)
        await store.apply("a", [MessageAdded(msg(3)), "nope"])  # type: ignore[list-item]
    assert await store.load("a") == before


async def test_damage_found_mid_batch_writes_nothing(
    store: RedisStore, raw: Redis, prefix: str
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    keys = store.session_keys("a")
    await raw.set(keys["inbound"], b"not a set")
    with pytest.raises(SessionCorrupt) as info:
        await store.apply("a", [MessageAdded(msg(2)), InboundReceived(5)])
    assert info.value.location == keys["inbound"].decode()
    [moved_msg] = [k for k in await quarantined(raw, prefix) if k.endswith(b":msg")]
    assert sorted(await raw.hkeys(moved_msg)) == [b"%016x" % (1 + 2**63)]  # seq 2 never written


# --- queued_limit and read_queued -----------------------------------------------------------------


async def _best_of(n: int, call: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(n):
        began = time.perf_counter()
        await call()
        best = min(best, time.perf_counter() - began)
    return best


async def test_queued_limit_reads_only_the_front_of_100k(store: RedisStore) -> None:
    total = 100_000
    for start in range(1, total + 1, 10_000):
        await store.apply("big", [MessageAdded(msg(s)) for s in range(start, start + 10_000)])
    state = await store.load("big", queued_limit=100)
    assert state is not None
    assert list(state.messages) == list(range(1, 101))
    assert state.queued_not_loaded == total - 100
    assert state.last_seq == total
    # Reading the front must not touch the rest: with 100 times the queue, a limited load costs
    # about the same, where a scan would cost about 100 times more. Compared side by side, best
    # of five each, so the machine's load slows both alike.
    await store.apply("small", [MessageAdded(msg(s)) for s in range(1, 1001)])
    small = await _best_of(5, lambda: store.load("small", queued_limit=100))
    big = await _best_of(5, lambda: store.load("big", queued_limit=100))
    assert big < 10 * small + 0.005, f"load(queued_limit=100): {big:.4f} s vs {small:.4f} s"
    await store.delete("small")
    seen: list[int] = []
    after = 0
    while page := await store.read_queued("big", after, 7_000):
        seen += [m.seq for m in page]
        after = page[-1].seq
    assert seen == list(range(1, total + 1))
    assert page == [] and after == total
    await store.delete("big")


async def test_full_load_by_the_lease_holder_reads_in_pages(
    make: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store_module, "_LOAD_PAGE", 7)
    holder, reader = make(), make()
    ops: list[Operation] = [MessageAdded(msg(s)) for s in range(1, 60)]
    ops += [PacketIdAssigned(s, s) for s in (2, 30, 59)] + [MessageReleased(30)]
    ops += [MessageAdded(StoredMessage(40, "r", b"", 2, released=True)), MessageRemoved(41)]
    await holder.apply("a", ops)
    atomic = await reader.load("a")  # no lease: one script
    await holder.acquire("a")
    paged = await holder.load("a")
    assert paged == atomic
    assert paged is not None and atomic is not None
    assert list(paged.messages) == list(atomic.messages)
    assert paged.queued_not_loaded == atomic.queued_not_loaded == 0
    assert paged.last_seq == atomic.last_seq == 59


async def test_queued_limit_keeps_every_in_flight_message(store: RedisStore) -> None:
    ops: list[Operation] = [MessageAdded(msg(s)) for s in range(1, 21)]
    ops += [PacketIdAssigned(s, 100 + s) for s in (3, 15, 20)]
    ops += [MessageReleased(15), MessageAdded(msg(25, packet_id=7)), MessageRemoved(4)]
    await store.apply("a", ops)
    full = await store.load("a")
    assert full is not None and full.queued_not_loaded == 0 and full.last_seq == 25
    state = await store.load("a", queued_limit=2)
    assert state is not None
    assert list(state.messages) == [1, 2, 3, 15, 20, 25]
    assert state.messages[15] == StoredMessage(15, "t/15", b"x" * 64, 2, False, 115, True)
    assert state.queued_not_loaded == 14
    assert state.last_seq == 25
    none_queued = await store.load("a", queued_limit=0)
    assert none_queued is not None and list(none_queued.messages) == [3, 15, 20, 25]
    assert none_queued.queued_not_loaded == 16
    with pytest.raises(InvalidInput):
        await store.load("a", queued_limit=-1)


async def test_read_queued_ranges(store: RedisStore) -> None:
    seqs = [-(2**63), -5, 0, 1, 2**53 + 1, 2**53 + 2, 2**63 - 1]
    await store.apply("a", [MessageAdded(msg(s)) for s in seqs])
    await store.apply("a", [MessageAdded(StoredMessage(9, "r", b"", 2, released=True))])
    await store.apply("a", [PacketIdAssigned(1, 11)])
    queued = [s for s in sorted([*seqs, 9]) if s != 1]

    async def read(after: int, limit: int) -> list[int]:
        return [m.seq for m in await store.read_queued("a", after, limit)]

    assert await read(-(2**64), 100) == queued
    assert await read(-(2**63), 100) == queued[1:]
    assert await read(-5, 2) == [0, 9]
    assert await read(2**53 + 1, 100) == [2**53 + 2, 2**63 - 1]
    assert await read(2**63 - 1, 100) == []
    assert await read(0, 0) == []
    [released] = await store.read_queued("a", 8, 1)
    assert released == StoredMessage(9, "r", b"", 2, released=True)
    assert await store.read_queued("nobody", 0, 10) == []
    state = await store.load("a", queued_limit=3)
    assert state is not None and list(state.messages) == [-(2**63), -5, 0, 1]
    assert state.last_seq == 2**63 - 1


# --- expiry through Redis -------------------------------------------------------------------------


async def test_redis_ttl_follows_the_session_ttl_and_accesses(
    make: Callable[..., RedisStore], raw: Redis, prefix: str
) -> None:
    # TTLs of seconds and comparisons of PTTLs before and after an access, so that a loaded
    # machine (a sleep that overruns, a slow reply) cannot make a key expire early.
    store = make(clock=time.time)
    await store.apply("a", [MessageAdded(msg(1)), InboundReceived(1), SubscriptionSet("s", 1)])
    await store.update_ttl("a", 10)
    keys = store.session_keys("a")
    present = await session_keys_present(raw, store, "a")
    assert set(present) == {"meta", "msg", "queue", "inbound", "subs"}
    for name in present:
        assert 0 < await raw.pttl(keys[name]) <= 10_000, name
    await asyncio.sleep(0.5)
    before = await raw.pttl(keys["meta"])
    assert before <= 9_500
    assert await store.load("a") is not None  # an access: Redis' TTL starts again
    await store.apply("a", [PacketIdAssigned(1, 5)])  # creates the inflight key: TTL'd too
    assert before < await raw.pttl(keys["inflight"]) <= 10_000
    assert await store.exists("a")
    for name in await session_keys_present(raw, store, "a"):
        assert before < await raw.pttl(keys[name]) <= 10_000, name
    # Now let it lapse: Redis reclaims every key by itself (nobody calls cleanup_expired).
    await store.update_ttl("a", 0.2)
    deadline = time.monotonic() + 10
    while await session_keys_present(raw, store, "a"):
        assert time.monotonic() < deadline, "Redis did not expire the session's keys"
        await asyncio.sleep(0.05)
    assert not await store.exists("a")
    assert await store.list_sessions() == []
    with pytest.raises(SessionExpired):
        await store.load("a")  # the index entry tells expired from never existed
    assert await store.load("a") is None
    assert not await raw.sismember(f"{prefix}:sessions", "a")


async def test_ttl_none_removes_the_redis_ttl(store: RedisStore, raw: Redis, prefix: str) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    await store.update_ttl("a", 100)
    assert await raw.zscore(f"{prefix}:expiry", "a") == T0 + 100
    await store.update_ttl("a", None)
    for name in await session_keys_present(raw, store, "a"):
        assert await raw.pttl(store.session_keys("a")[name]) == -1
    assert await raw.zscore(f"{prefix}:expiry", "a") is None


async def test_cleanup_counts_sessions_redis_already_reclaimed(
    make: Callable[..., RedisStore], raw: Redis, prefix: str
) -> None:
    store = make(clock=time.time)
    for client_id in ("a", "b", "c"):
        await store.apply(client_id, [MessageAdded(msg(1))])
    await store.update_ttl("a", 0.2)
    await store.update_ttl("b", 60)
    await asyncio.sleep(0.4)
    assert await session_keys_present(raw, store, "a") == []
    assert sorted(await raw.smembers(f"{prefix}:sessions")) == [b"a", b"b", b"c"]
    assert await store.cleanup_expired() == 1
    assert sorted(await raw.smembers(f"{prefix}:sessions")) == [b"b", b"c"]
    assert await store.cleanup_expired() == 0
    assert [info.client_id for info in await store.list_sessions()] == ["b", "c"]


async def test_expiry_by_the_clock_before_redis_expires(
    store: RedisStore, clock: FakeClock, raw: Redis
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    await store.update_ttl("a", 30)
    clock.advance(31)  # the store's clock says expired; Redis' keys still live 30 s
    assert await session_keys_present(raw, store, "a") == ["meta", "msg", "queue"]
    with pytest.raises(SessionExpired):
        await store.load("a")
    assert await session_keys_present(raw, store, "a") == []


# --- damage ---------------------------------------------------------------------------------------

Damage = Callable[[Redis, dict[str, bytes]], Awaitable[Any]]

SEQ1 = b"%016x" % (1 + 2**63)


async def _replace_type(raw: Redis, key: bytes) -> None:
    await raw.delete(key)
    await raw.rpush(key, b"a list now")


DAMAGES: dict[str, tuple[str, Damage]] = {
    "message-garbage": ("msg", lambda r, k: r.hset(k["msg"], SEQ1, b"\xff\x00garbage")),
    "message-truncated": (
        "msg",
        lambda r, k: r.hset(k["msg"], SEQ1, encode_operation(MessageAdded(msg(1)))[:-3]),
    ),
    "message-of-another-seq": (
        "msg",
        lambda r, k: r.hset(k["msg"], SEQ1, encode_operation(MessageAdded(msg(2)))),
    ),
    "meta-last-access": ("meta", lambda r, k: r.hset(k["meta"], "last_access", "soon")),
    "meta-ttl": ("meta", lambda r, k: r.hset(k["meta"], "ttl", "-5")),
    "meta-last-seq": ("meta", lambda r, k: r.hset(k["meta"], "last_seq", "1.5")),
    "meta-version": ("meta", lambda r, k: r.hset(k["meta"], "v", "one")),
    "meta-missing": ("meta", lambda r, k: r.delete(k["meta"])),
    "meta-wrong-type": ("meta", lambda r, k: _replace_type(r, k["meta"])),
    "inbound-wrong-type": ("inbound", lambda r, k: _replace_type(r, k["inbound"])),
    "inbound-garbage": ("inbound", lambda r, k: r.sadd(k["inbound"], "abc")),
    "packet-id-range": ("inflight", lambda r, k: r.hset(k["inflight"], SEQ1, "65536")),
    "subscription-flags": ("subs", lambda r, k: r.hset(k["subs"], "s", "7")),
    "queue-member": ("queue", lambda r, k: r.zadd(k["queue"], {b"zz": 0})),
    "orphan-message": ("msg", lambda r, k: r.hset(k["msg"], b"%016x" % (5 + 2**63), b"?")),
    "meta-protocol": ("meta", lambda r, k: r.hset(k["meta"], "protocol", "3")),
    "subscription-retain-handling-3": ("subs", lambda r, k: r.hset(k["subs"], "s", 0x30 << 8)),
    "subscription-reserved-bits": ("subs", lambda r, k: r.hset(k["subs"], "s", 8)),
    "subscription-id-range": ("subs", lambda r, k: r.hset(k["subs"], "s", 268_435_456 << 16)),
    "aside-wrong-type": ("aside", lambda r, k: _replace_type(r, k["aside"])),
    "aside-garbage": ("aside", lambda r, k: r.hset(k["aside"], SEQ1, b"\x0d\x00")),
    "aside-message-only": (
        "aside",
        lambda r, k: r.hset(k["aside"], SEQ1, encode_operation(MessageAdded(msg(1)))),
    ),
    "aside-of-another-seq": (
        "aside",
        lambda r, k: r.hset(
            k["aside"],
            SEQ1,
            encode_operation(MessageAdded(msg(2))) + encode_operation(MessageSetAside(2, "", 0)),
        ),
    ),
    "aside-with-packet-id": (
        "aside",
        lambda r, k: r.hset(
            k["aside"],
            SEQ1,
            encode_operation(MessageAdded(msg(1, packet_id=3)))
            + encode_operation(MessageSetAside(1, "", 0)),
        ),
    ),
}


@pytest.mark.parametrize("name", list(DAMAGES))
async def test_damage_is_reported_and_moved_aside(
    name: str, store: RedisStore, raw: Redis, prefix: str
) -> None:
    where, damage = DAMAGES[name]
    await store.apply(
        "a",
        [
            MessageAdded(msg(1)),
            MessageAdded(msg(2)),
            PacketIdAssigned(2, 9),
            InboundReceived(4),
            SubscriptionSet("s", 1),
        ],
    )
    await store.update_ttl("a", 1000)
    keys = store.session_keys("a")
    await damage(raw, keys)
    names = await session_keys_present(raw, store, "a")
    snapshot = {n: await raw.dump(keys[n]) for n in names}
    with pytest.raises(SessionCorrupt) as info:
        await store.load("a")
    exc = info.value
    assert not isinstance(exc, UnsupportedFormatVersion)
    assert exc.location == keys[where].decode()
    assert keys[where].decode() in str(exc)
    assert exc.quarantined_to is not None
    assert exc.quarantined_to.startswith(f"{prefix}:quarantine:")
    assert await session_keys_present(raw, store, "a") == []
    moved = await quarantined(raw, prefix)
    assert sorted(key.rsplit(b":", 1)[1].decode() for key in moved) == sorted(names)
    for key in moved:
        original = snapshot[key.rsplit(b":", 1)[1].decode()]
        assert await raw.dump(key) == original  # moved intact
        assert await raw.pttl(key) == -1  # and never expiring, though the session had a TTL
    assert await store.load("a") is None  # gone: a fresh session may start
    assert await store.list_sessions() == []
    await store.apply("a", [MessageAdded(msg(3))])
    assert await quarantined(raw, prefix) == moved  # a new session leaves the old data alone
    await store.delete("a")
    assert await quarantined(raw, prefix) == moved


async def test_save_over_damage_moves_it_aside_first(
    store: RedisStore, raw: Redis, prefix: str
) -> None:
    await store.apply("a", [MessageAdded(msg(1)), InboundReceived(3)])
    await _replace_type(raw, store.session_keys("a")["inbound"])
    snapshot = SessionState("a")
    snapshot.apply_all([MessageAdded(msg(2)), SubscriptionSet("s", 2)])
    await store.save(snapshot)
    assert await store.load("a") == snapshot
    assert len(await quarantined(raw, prefix)) == 4  # meta, msg, queue, the damaged inbound


async def test_damage_found_by_read_queued_is_moved_aside(
    store: RedisStore, raw: Redis, prefix: str
) -> None:
    await store.apply("a", [MessageAdded(msg(1)), MessageAdded(msg(2))])
    await raw.hset(store.session_keys("a")["msg"], SEQ1, b"junk")
    with pytest.raises(SessionCorrupt):
        await store.read_queued("a", 0, 10)
    assert await store.read_queued("a", 0, 10) == []
    assert len(await quarantined(raw, prefix)) == 3


async def test_damaged_session_is_listed_as_skipped_but_exists(
    store: RedisStore, raw: Redis
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    await store.apply("b", [MessageAdded(msg(1))])
    await raw.hset(store.session_keys("b")["meta"], "created_at", "yesterday")
    assert [info.client_id for info in await store.list_sessions()] == ["a"]
    assert await store.exists("b")


async def test_two_quarantines_in_the_same_instant_do_not_collide(
    store: RedisStore, raw: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Frozen(quarantine_module.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return quarantine_module.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=tz)

    monkeypatch.setattr(quarantine_module, "datetime", Frozen)
    for _ in range(3):
        await store.apply("a", [MessageAdded(msg(1))])
        await raw.hset(store.session_keys("a")["msg"], SEQ1, b"junk")
        with pytest.raises(SessionCorrupt):
            await store.load("a")
    moved = await quarantined(raw, prefix)
    stamps = {key.split(b":")[-3] for key in moved}
    assert stamps == {b"20300102T030405.000006Z", b"20300102T030405.000006Z-1",
                      b"20300102T030405.000006Z-2"}  # fmt: skip


# --- format versions ------------------------------------------------------------------------------


async def test_newer_prefix_format_is_refused(
    make: Callable[..., RedisStore], raw: Redis, prefix: str
) -> None:
    await raw.set(f"{prefix}:format", redis_module.FORMAT_VERSION + 1)
    store = make()
    with pytest.raises(UnsupportedFormatVersion) as info:
        await store.open()
    assert info.value.location == f"{prefix}:format"
    assert info.value.quarantined_to is None
    with pytest.raises(UnsupportedFormatVersion):
        await store.load("a")
    await raw.set(f"{prefix}:format", "x")
    with pytest.raises(SessionCorrupt):
        await make().open()
    await raw.set(f"{prefix}:format", 0)
    await make().open()  # older: raised to ours, sessions migrate one by one
    assert await raw.get(f"{prefix}:format") == b"%d" % redis_module.FORMAT_VERSION


async def test_newer_session_format_is_refused_and_left_in_place(
    store: RedisStore, raw: Redis, prefix: str
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    meta = store.session_keys("a")["meta"]
    await raw.hset(meta, "v", redis_module.FORMAT_VERSION + 1)
    with pytest.raises(UnsupportedFormatVersion) as info:
        await store.load("a")
    assert info.value.location == meta.decode()
    with pytest.raises(UnsupportedFormatVersion):
        await store.apply("a", [MessageAdded(msg(2))])
    assert await session_keys_present(raw, store, "a") == ["meta", "msg", "queue"]
    assert await raw.hlen(store.session_keys("a")["msg"]) == 1
    assert await quarantined(raw, prefix) == []


async def test_migration_hook(
    store: RedisStore, raw: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.apply("a", [MessageAdded(msg(1))])
    meta = store.session_keys("a")["meta"]
    await raw.hset(meta, "v", 0)
    calls: list[object] = []
    # Runs like every session script: KEYS[1] is the session's meta.
    script = raw.register_script(
        "redis.call('HSET', KEYS[1], 'v', '1', 'by', ARGV[4]) return {'ok'}"
    )

    def migrate_0_to_1(scripts: Any) -> Any:
        calls.append(scripts)
        return script

    monkeypatch.setitem(redis_server_module.MIGRATIONS, 0, migrate_0_to_1)
    state = await store.load("a")
    assert state is not None and list(state.messages) == [1]
    assert len(calls) == 1 and await raw.hget(meta, "by") == b"a"
    # ... and then the real migrations up to the current version.
    assert await raw.hget(meta, "v") == b"%d" % redis_module.FORMAT_VERSION
    # A version no migration starts from is damage.
    monkeypatch.delitem(redis_server_module.MIGRATIONS, 0)
    await raw.hset(meta, "v", 0)
    with pytest.raises(SessionCorrupt) as info:
        await store.load("a")
    assert info.value.quarantined_to is not None
    assert len(await quarantined(raw, prefix)) == 3


# --- leases ---------------------------------------------------------------------------------------


async def test_second_store_is_locked_out(make: Callable[..., RedisStore]) -> None:
    first, second = make(), make()
    await first.acquire("a")
    await first.apply("a", [MessageAdded(msg(1))])
    with pytest.raises(SessionLocked) as info:
        await second.acquire("a")
    assert f"pid {os.getpid()}" in str(info.value)
    assert os.uname().nodename in str(info.value)
    for refused in (
        second.apply("a", [MessageAdded(msg(2))]),
        second.apply("a", []),
        second.load("a"),
        second.save(SessionState("a")),
        second.update_ttl("a", 5),
        second.delete("a"),
    ):
        with pytest.raises(SessionLocked):
            await refused
    # Reading needs no lease.
    assert await second.exists("a")
    assert [m.seq for m in await second.read_queued("a", 0, 10)] == [1]
    assert [info.client_id for info in await second.list_sessions()] == ["a"]
    await first.release("a")
    await second.acquire("a")
    state = await second.load("a")
    assert state is not None and list(state.messages) == [1]


async def test_renewal_keeps_the_lease_beyond_its_ttl(
    make: Callable[..., RedisStore], raw: Redis
) -> None:
    holder, other = make(lease_ttl=0.3), make(lease_ttl=0.3)
    await holder.acquire("a")
    lease = holder.session_keys("a")["lease"]
    await asyncio.sleep(1.0)
    assert 0 < await raw.pttl(lease) <= 300
    with pytest.raises(SessionLocked):
        await other.acquire("a")
    await holder.apply("a", [MessageAdded(msg(1))])
    await holder.release("a")
    assert not await raw.exists(lease)
    await other.acquire("a")


async def test_a_lost_lease_refuses_writes(make: Callable[..., RedisStore]) -> None:
    stalled, other = make(lease_ttl=0.2), make(lease_ttl=0.2)
    await stalled.acquire("a")
    await stalled.apply("a", [MessageAdded(msg(1))])
    # A blocked event loop: the renewal cannot run, the lease expires.
    time.sleep(0.3)  # noqa: ASYNC251 - blocking on purpose
    await other.acquire("a")
    with pytest.raises(SessionLocked, match="held by"):
        await stalled.apply("a", [MessageAdded(msg(2))])
    await other.release("a")
    with pytest.raises(SessionLocked, match="expired"):
        await stalled.apply("a", [MessageAdded(msg(2))])  # still refused: it was lost
    await stalled.release("a")
    await stalled.acquire("a")
    await stalled.apply("a", [MessageAdded(msg(2))])
    state = await stalled.load("a")
    assert state is not None and list(state.messages) == [1, 2]


async def test_release_deletes_only_our_own_lease(store: RedisStore, raw: Redis) -> None:
    await store.acquire("a")
    lease = store.session_keys("a")["lease"]
    await raw.set(lease, b"someone else")
    await store.release("a")
    assert await raw.get(lease) == b"someone else"


async def test_a_holder_on_another_host_is_waited_for(store: RedisStore, raw: Redis) -> None:
    lease = store.session_keys("a")["lease"]
    await raw.set(lease, json.dumps({"host": "elsewhere", "pid": 1}), px=10_000)
    with pytest.raises(SessionLocked, match="pid 1 on host 'elsewhere'"):
        await store.acquire("a")


def test_owner_is_dead_only_when_provably_so() -> None:
    me = redis_owners.identity()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def owner(**changes: Any) -> bytes:
        return json.dumps({**me, **changes}).encode()

    assert redis_owners.owner_is_dead(owner(pid=dead.pid))
    assert not redis_owners.owner_is_dead(owner())  # this very process
    parent = redis_owners.process_facts(os.getppid())
    alive = owner(pid=os.getppid(), start=parent[1] if parent else None)
    assert not redis_owners.owner_is_dead(alive)
    assert not redis_owners.owner_is_dead(owner(pid=dead.pid, host="elsewhere"))
    assert not redis_owners.owner_is_dead(owner(pid=dead.pid, pidns="pid:[1]"))
    assert not redis_owners.owner_is_dead(owner(pid=dead.pid, boot="another boot"))
    assert not redis_owners.owner_is_dead(b"not json")
    if "start" in me:
        # Our pid, but a process that started at another time: an earlier holder of our pid.
        assert redis_owners.owner_is_dead(owner(start=me["start"] - 1))
        assert redis_owners.owner_is_dead(owner(pid=os.getppid(), start=-1))


async def test_lease_of_a_killed_process_is_taken_over_at_once(
    store: RedisStore, url: str, prefix: str
) -> None:
    child = await asyncio.to_thread(start_holder, RedisStore, "a", url, prefix=prefix)
    try:
        with pytest.raises(SessionLocked, match=f"pid {child.pid} "):
            await store.acquire("a")
    finally:
        stop_holder(child, kill=True)
    began = time.monotonic()
    await store.acquire("a")  # the default lease_ttl is 15 s: no waiting for it
    # Waiting the lease out would take 15 s; a third of that leaves any loaded machine room.
    assert time.monotonic() - began < 5.0
    await store.apply("a", [MessageAdded(msg(1))])


# --- SIGKILL --------------------------------------------------------------------------------------

_BATCHES = textwrap.dedent(
    """
    import random
    from mqtt_persist.session.state import (
        InboundReceived, InboundReleased, MessageAdded, MessageReleased, MessageRemoved,
        MessageRequeued, PacketIdAssigned, StoredMessage, SubscriptionRemoved, SubscriptionSet,
    )

    def size(n):
        return random.Random(n).randint(1, 30)

    def make_batch(n):
        rng = random.Random(n * 7919 + 1)
        ops = [
            MessageAdded(StoredMessage(n * 100 + i, f"t/{n}", rng.randbytes(rng.randint(0, 200)),
                                       rng.choice((1, 2))))
            for i in range(size(n))
        ]
        if n >= 1:
            ops += [PacketIdAssigned((n - 1) * 100 + i, (n + i) % 65535 + 1)
                    for i in range(0, size(n - 1), 2)]
            ops.append(MessageReleased((n - 1) * 100))
        if n >= 2:
            ops.append(MessageRequeued((n - 2) * 100))
        if n >= 3:
            ops += [MessageRemoved((n - 3) * 100 + i) for i in range(1, size(n - 3))]
        ops.append(InboundReceived(n % 65535 + 1))
        if n >= 2:
            ops.append(InboundReleased((n - 2) % 65535 + 1))
        ops.append(SubscriptionSet(f"s/{n % 7}", n % 3, confirmed=n % 2 == 0))
        if n % 5 == 4:
            ops.append(SubscriptionRemoved(f"s/{(n + 3) % 7}"))
        return ops
    """
)

_WRITER = textwrap.dedent(
    """
    from mqtt_persist.stores.redis import RedisStore
    from tests.support.store_kill import write_batches

    write_batches(lambda args: RedisStore(args[0], prefix=args[1]), make_batch)
    """
)


def test_sigkill_loses_nothing_acknowledged(url: str, prefix: str) -> None:
    batches = Batches(_BATCHES)

    async def recover() -> SessionState | None:
        # The killed writer still "holds" the lease: same host, dead pid, so it is taken over.
        async with RedisStore(url, prefix=prefix) as store:
            await store.acquire(VICTIM)
            return await store.load(VICTIM)

    # The batch after the last printed one may have committed before the kill; no other.
    for round_ in kill_rounds(batches, _WRITER, [url, prefix], recover, rounds=4, max_delay=0.3):
        seqs = [s for k in range(round_.recovered + 1) for s in _seqs(batches.make(k))]
        assert round_.state.last_seq == max(seqs)


def _seqs(ops: list[Operation]) -> list[int]:
    return [op.message.seq for op in ops if isinstance(op, MessageAdded)]


# --- odds and ends --------------------------------------------------------------------------------


async def test_password_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0", prefix="p")
    assert "s3cret" not in repr(store) and "s3cret" not in store.url
    assert store.url == "redis://user:***@127.0.0.1:1/0"
    with pytest.raises(StoreError) as info:
        await store.load("a")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in caplog.text
    await store.close()


async def test_shared_client_and_bad_arguments(url: str, prefix: str) -> None:
    async with Redis.from_url(url, decode_responses=True) as decoding:
        with pytest.raises(InvalidInput):
            RedisStore(client=decoding)
    async with Redis.from_url(url) as client:
        async with RedisStore(client=client, prefix=prefix) as store:
            await store.apply("a", [MessageAdded(msg(1))])
        assert await client.ping()  # the store did not close a client it was given
    with pytest.raises(InvalidInput):
        RedisStore(url, prefix="")
    with pytest.raises(InvalidInput):
        RedisStore(url, lease_ttl=0)
    async with RedisStore(url, prefix=prefix) as store:
        with pytest.raises(InvalidInput):
            await store.update_ttl("a", -1)


async def test_save_keeps_created_at_ttl_and_a_growing_last_seq(
    store: RedisStore, clock: FakeClock, raw: Redis
) -> None:
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
    for name in await session_keys_present(raw, store, "a"):
        assert await raw.pttl(store.session_keys("a")[name]) > 0


async def test_concurrent_calls_for_one_session_keep_their_order(store: RedisStore) -> None:
    # Added, then assigned a packet id: issued without waiting, still applied in call order.
    calls = []
    for s in range(200):
        calls.append(store.apply("a", [MessageAdded(msg(s))]))
        calls.append(store.apply("a", [PacketIdAssigned(s, s + 1)]))
    await asyncio.gather(*calls)
    state = await store.load("a")
    assert state is not None
    assert all(m.packet_id == m.seq + 1 for m in state.messages.values())
