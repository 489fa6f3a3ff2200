"""``mqtt-persist sessions ...`` as a subprocess against every durable store.

Each test groups its assertions around few runs (a run costs about 0.3 s of start-up). The
sessions are written in-process through the store API, the command's ``--json`` output is
parsed back and compared with the state the operations define (``SessionState.apply``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mqtt_persist import store_from_url
from mqtt_persist.cli.session_file import Header, encode_header
from mqtt_persist.session.state import MessageAdded, SessionState, StoredMessage
from mqtt_persist.stores.base import SessionStore
from tests.support.cli import Result, rich_session_ops, run_cli
from tests.support.redis_server import shared_redis_url, unique_prefix

KINDS = ["file", "sqlite", "redis"]
_T = TypeVar("_T")


def store_url(kind: str, tmp_path: Path, name: str = "a") -> str:
    """A URL of a fresh store of this kind, private to the test."""
    if kind == "file":
        return (tmp_path / f"{name}-sessions").as_uri()
    if kind == "sqlite":
        return f"sqlite://{tmp_path / f'{name}.db'}?synchronous=NORMAL"
    if kind == "postgres":
        from tests.support.postgres import shared_postgres_url, unique_schema

        return f"{shared_postgres_url()}?schema={unique_schema(tmp_path / name)}"
    pytest.importorskip("redis", reason="redis-py not installed")
    return f"{shared_redis_url()}?prefix={unique_prefix(tmp_path / name)}"


def with_store(url: str, work: Callable[[SessionStore], Awaitable[_T]]) -> _T:
    """Run ``work(store)`` on the store the URL names, opened for it."""

    async def run() -> _T:
        store = store_from_url(url)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def one_line_error(result: Result, code: int, *fragments: str) -> None:
    """The run failed with ``code`` and exactly one line on stderr naming the fragments."""
    assert result.code == code, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mqtt-persist: error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result


def replayed(ops: list[Any], client_id: str = "dev-1") -> SessionState:
    state = SessionState(client_id)
    state.apply_all(ops)
    return state


@pytest.mark.parametrize("kind", [*KINDS, "postgres"])
def test_list_show_cleanup_delete(kind: str, tmp_path: Path) -> None:
    url = store_url(kind, tmp_path)
    ops = rich_session_ops(queued=1005)  # more than one page (1000) of queued messages
    expected = replayed(ops)

    async def setup(store: SessionStore) -> None:
        await store.apply("dev-1", ops)
        await store.update_ttl("dev-1", 3600)
        await store.apply("dev-2", [MessageAdded(StoredMessage(1, "t", b"x", 1))])
        await store.apply("old", [MessageAdded(StoredMessage(1, "t", b"x", 1))])
        await store.update_ttl("old", 0.05)

    with_store(url, setup)
    time.sleep(0.1)  # "old" expires
    now = time.time()

    # list --json: every session, expired ones included and flagged
    listed = run_cli("sessions", "list", "--store", url, "--json")
    assert listed.code == 0, listed
    rows = {row["client_id"]: row for row in listed.json()}
    # Redis drops an expired session's keys by itself (their TTL): nothing left to clean up.
    redis_expired_it = kind == "redis"
    assert set(rows) == {"dev-1", "dev-2"} | (set() if redis_expired_it else {"old"})
    queued = [m for m in expected.messages.values() if m.packet_id is None]
    assert rows["dev-1"]["queued"] == len(queued) == 1005
    assert rows["dev-1"]["inflight"] == 3
    assert rows["dev-1"]["set_aside"] == 2
    assert rows["dev-1"]["expires_at"] == pytest.approx(now + 3600, abs=30)
    assert rows["dev-1"]["expired"] is False
    assert redis_expired_it or rows["old"]["expired"] is True
    assert rows["dev-2"]["expires_at"] is None

    # show --json: everything the session holds, the whole queue counted and listed
    shown = run_cli("sessions", "show", "dev-1", "--store", url, "--json", "--limit", "0")
    assert shown.code == 0, shown
    view = shown.json()
    assert view["client_id"] == "dev-1" and view["protocol_version"] == 5
    assert view["queued_count"] == 1005 and view["inflight_count"] == 3
    assert [m["seq"] for m in view["queued"]] == [m.seq for m in queued]
    assert [(m["seq"], m["packet_id"], m["qos"], m["state"]) for m in view["inflight"]] == [
        (1, 101, 1, "awaiting PUBACK"),
        (3, 103, 2, "awaiting PUBREC"),
        (6, 106, 2, "awaiting PUBCOMP"),
    ]
    first = view["queued"][0]
    message = expected.messages[first["seq"]]
    assert (first["topic"], first["qos"], first["retain"], first["size"]) == (
        message.topic,
        message.qos,
        message.retain,
        len(message.payload),
    )
    assert [(a["seq"], a["reason"], a["at"]) for a in view["set_aside"]] == [
        (seq, aside.reason, aside.at) for seq, aside in sorted(expected.set_aside.items())
    ]
    assert view["inbound_qos2"] == [7, 65535]
    assert view["pending_unsubscribes"] == ["old/filter"]
    subscriptions = {s["topic_filter"]: s for s in view["subscriptions"]}
    assert set(subscriptions) == {"site/+/cmd", "alarms/#", "ä/ö"}
    alarms = subscriptions["alarms/#"]
    assert (alarms["qos"], alarms["confirmed"], alarms["subscription_id"]) == (2, False, 4242)
    assert (alarms["no_local"], alarms["retain_as_published"], alarms["retain_handling"]) == (
        True,
        True,
        2,
    )
    assert subscriptions["site/+/cmd"]["confirmed"] is True
    payload_bytes = sum(len(m.payload) for m in expected.messages.values())
    payload_bytes += sum(len(a.message.payload) for a in expected.set_aside.values())
    assert view["payload_bytes"] == payload_bytes

    if not redis_expired_it:
        # cleanup leaves an expired session alone while a client holds it ...
        async def cleanup_while_held(store: SessionStore) -> tuple[Result, bool]:
            await store.acquire("old")
            cleaned = await asyncio.to_thread(run_cli, "sessions", "cleanup", "--store", url)
            return cleaned, "old" in {i.client_id for i in await store.list_sessions()}

        skipped, kept_old = with_store(url, cleanup_while_held)
        assert (skipped.code, skipped.out) == (0, "removed 0 expired session(s)\n"), skipped
        assert kept_old

    # ... and removes it (and nothing else) once it is free
    cleaned = run_cli("sessions", "cleanup", "--store", url, "--json")
    assert cleaned.code == 0, cleaned
    # (RedisStore may still count the leftovers of the session Redis expired.)
    assert cleaned.json()["removed"] == 1 or (redis_expired_it and cleaned.json()["removed"] == 0)

    # delete is refused while a client (here: this test process) holds the session
    async def delete_while_held(store: SessionStore) -> tuple[Result, bool]:
        await store.acquire("dev-2")
        refused = await asyncio.to_thread(
            run_cli, "sessions", "delete", "dev-2", "--yes", "--store", url
        )
        return refused, await store.exists("dev-2")

    refused, kept = with_store(url, delete_while_held)
    one_line_error(refused, 3, "dev-2", "held")
    assert kept

    deleted = run_cli("sessions", "delete", "dev-2", "--yes", "--json", "--store", url)
    assert deleted.code == 0, deleted
    assert deleted.json() == {"deleted": ["dev-2"]}

    async def remaining(store: SessionStore) -> list[str]:
        return sorted(info.client_id for info in await store.list_sessions())

    assert with_store(url, remaining) == ["dev-1"]


def test_tables_for_people_and_errors(tmp_path: Path) -> None:
    url = store_url("file", tmp_path)
    ops = rich_session_ops(queued=30)
    with_store(url, lambda store: store.apply("dev-1", ops))

    listed = run_cli("sessions", "list", "--store", url)
    assert listed.code == 0, listed
    header, row = listed.out.splitlines()
    assert header.split()[:4] == ["CLIENT", "ID", "QUEUED", "IN"]
    assert row.split()[:4] == ["dev-1", "30", "3", "2"]
    assert row.endswith("never")

    shown = run_cli("sessions", "show", "dev-1", "--store", url, "--limit", "3")
    assert shown.code == 0, shown
    text = shown.out
    for fragment in (
        "session dev-1",
        "protocol      MQTT 5",
        "30 queued, 3 in flight, 2 set aside",
        "queued (30; the first 3 shown)",
        "awaiting PUBACK",
        "awaiting PUBREC",
        "awaiting PUBCOMP",
        "poison: the broker closed the connection on it",
        "alarms/#",
        "pending unsubscribes: old/filter",
        "packet ids: 7, 65535",
    ):
        assert fragment in text, text

    # (More error paths run in-process: test_cli_units.py::test_errors_are_one_line.)
    one_line_error(run_cli("sessions", "show", "nobody", "--store", url), 4, "no session 'nobody'")


def test_export_import_round_trip_across_store_kinds(tmp_path: Path) -> None:
    """file -> sqlite -> redis, exact: every field of the original state, and its TTL."""
    file_url, sqlite_url, redis_url = (store_url(k, tmp_path, k) for k in KINDS)
    # Queued messages past a page (1000): the export reads them in two.
    ops = rich_session_ops(queued=1005)
    expected = replayed(ops)

    async def setup(store: SessionStore) -> None:
        await store.apply("dev-1", ops)
        await store.update_ttl("dev-1", 7200)

    with_store(file_url, setup)

    exported = tmp_path / "dev-1.jsonl"
    first = run_cli(
        "sessions", "export", "dev-1", "--store", file_url, "-o", exported, "--progress"
    )
    assert first.code == 0, first
    assert "exporting" in first.err  # the bar's label (a terminal would see the bar itself)
    lines = exported.read_bytes().splitlines()
    assert len(lines) == 1 + 2 + 1008 + 2 + 3 + 1  # header, set aside, messages, ids, subs, unsub

    into_sqlite = run_cli("sessions", "import", exported, "--store", sqlite_url, "--json")
    assert into_sqlite.code == 0, into_sqlite
    assert into_sqlite.json() == {"client_id": "dev-1", "records": len(lines) - 1}

    # sqlite -> stdout -> stdin -> redis
    second = run_cli("sessions", "export", "dev-1", "--store", sqlite_url)
    assert second.code == 0, second
    into_redis = run_cli("sessions", "import", "-", "--store", redis_url, input=second.out_bytes)
    assert into_redis.code == 0, into_redis

    async def loaded(store: SessionStore) -> tuple[SessionState | None, float | None]:
        info = {i.client_id: i for i in await store.list_sessions()}["dev-1"]
        ttl = None if info.expires_at is None else info.expires_at - info.last_access
        return await store.load("dev-1"), ttl

    state, ttl = with_store(redis_url, loaded)
    assert state is not None
    assert ttl == pytest.approx(7200)
    assert state.protocol_version == expected.protocol_version == 5
    assert list(state.messages) == list(expected.messages)
    for seq, message in expected.messages.items():
        assert state.messages[seq] == message, seq  # every field, packet ID and released too
    assert state.set_aside == expected.set_aside
    assert state.inbound_qos2 == expected.inbound_qos2
    assert state.subscriptions == expected.subscriptions
    assert state.pending_unsubscribes == expected.pending_unsubscribes
    assert state == expected

    # An existing session is refused without --replace, and a bad file never replaces one.
    again = run_cli("sessions", "import", exported, "--store", redis_url)
    one_line_error(again, 5, "dev-1", "--replace")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    refused = run_cli("sessions", "import", truncated, "--store", redis_url, "--replace")
    one_line_error(refused, 2, "truncated")
    assert with_store(redis_url, loaded)[0] == expected


def test_export_into_a_missing_directory_names_the_output(tmp_path: Path) -> None:
    """The temporary file beside the output is an implementation detail: the error names the
    path given to -o, without a Python exception name."""
    store = (tmp_path / "s").as_uri()
    with_store(store, lambda s: s.apply("dev-1", rich_session_ops(queued=1)))
    output = tmp_path / "missing" / "dev-1.jsonl"
    result = run_cli("sessions", "export", "dev-1", "--store", store, "-o", output)
    one_line_error(result, 2, str(output), "No such file or directory")
    assert "Error:" not in result.err and ".dev-1.jsonl." not in result.err, result


def test_delete_changes_nothing_when_one_of_the_sessions_is_held(tmp_path: Path) -> None:
    """Exit 3 says nothing was changed: a session listed before the held one is not deleted
    either (it was, silently: the error named only the held one)."""
    store_url = (tmp_path / "s").as_uri()
    for client_id in ("a", "held", "z"):
        with_store(store_url, lambda s, c=client_id: s.apply(c, rich_session_ops(queued=1)))
    holder = store_from_url(store_url)
    asyncio.run(holder.open())
    asyncio.run(holder.acquire("held"))  # the lease (a flock) outlives this loop
    try:
        result = run_cli("sessions", "delete", "a", "held", "z", "--yes", "--store", store_url)
    finally:
        asyncio.run(holder.close())
    one_line_error(result, 3, "held")
    listed = with_store(store_url, lambda s: s.list_sessions())
    assert sorted(i.client_id for i in listed) == ["a", "held", "z"], result


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_commands_that_only_read_or_remove_refuse_a_missing_store(
    kind: str, tmp_path: Path
) -> None:
    """A mistyped --store is refused by name, and not created (it was, then listed as empty)."""
    missing = tmp_path / ("typo-sessions" if kind == "file" else "typo.db")
    url = missing.as_uri() if kind == "file" else f"sqlite://{missing}"
    for command in (
        ["list"],
        ["list", "--json"],
        ["show", "dev-1"],
        ["export", "dev-1"],
        ["delete", "dev-1", "--yes"],
        ["cleanup"],
    ):
        result = run_cli("sessions", *command, "--store", url)
        one_line_error(result, 2, str(missing), "does not exist")
        assert result.out == "", (command, result)
        assert list(tmp_path.iterdir()) == [], (command, result)
    # Import creates the store, as a client does.
    exported = tmp_path / "dev-1.jsonl"
    exported.write_bytes(encode_header(Header("dev-1", 5, None, 0, 1.0)))
    assert run_cli("sessions", "import", exported, "--store", url).code == 0
    assert missing.exists()
    exported.unlink()
    listed = run_cli("sessions", "list", "--store", url, "--json")
    assert listed.code == 0 and [r["client_id"] for r in listed.json()] == ["dev-1"], listed


def test_a_session_skipped_as_damaged_is_not_reported_as_missing_alone(tmp_path: Path) -> None:
    """The store's warning about the damaged journal came first, then "no session 'dev'"
    as if there were none: the error now says why it may be missing."""
    url = store_url("file", tmp_path)

    async def setup(store: SessionStore) -> None:
        for op in rich_session_ops(queued=3):  # one record each: damage in the middle
            await store.apply("dev", [op])

    with_store(url, setup)
    (journal,) = (tmp_path / "a-sessions").glob("dev-*.journal")
    data = bytearray(journal.read_bytes())
    data[len(data) // 3] ^= 0xFF
    journal.write_bytes(bytes(data))
    result = run_cli("sessions", "show", "dev", "--store", url)
    assert result.code == 4, result
    warning, error = result.err.splitlines()
    assert warning.startswith("mqtt-persist: WARNING: skipping damaged session"), result
    assert error.startswith("mqtt-persist: error: no session 'dev' in this store"), result
    assert "1 damaged session skipped (the warning above)" in error, result


def test_import_refuses_damaged_message_properties_before_storing(tmp_path: Path) -> None:
    """A property identifier without its value ("AQ==") was stored as it was: the client
    would fail to decode it when it came to send the message."""
    url = store_url("file", tmp_path)
    header = encode_header(Header("dev-1", 5, None, 2, 1.0))
    record = (
        '{"type":"message","seq":%d,"topic":"t","qos":1,"retain":false,"payload":"",'
        '"properties":"%s","expires_at":null,"packet_id":null,"released":false}\n'
    )
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(header + (record % (1, "AQE=") + record % (2, "AQ==")).encode())
    result = run_cli("sessions", "import", damaged, "--store", url)
    one_line_error(result, 2, "line 3: 'properties' of seq 2", "Payload Format Indicator")
    assert with_store(url, lambda store: store.list_sessions()) == []
