"""``store_from_url``: every scheme, its options, its errors, and no password in any of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mqtt_persist
from mqtt_persist import FileStore, InvalidInput, MemoryStore, SQLiteStore, store_from_url
from mqtt_persist.session.state import MessageAdded
from mqtt_persist.stores import urls
from mqtt_persist.stores.urls import SCHEMES, StoreURL, redact_url


def test_every_store_is_importable_from_the_package() -> None:
    from mqtt_persist import PostgresStore as PostgresFromPackage
    from mqtt_persist import RedisStore as FromPackage
    from mqtt_persist import stores
    from mqtt_persist.stores import PostgresStore, RedisStore, SQLiteStore

    assert FromPackage is RedisStore
    assert PostgresFromPackage is PostgresStore
    assert mqtt_persist.SQLiteStore is SQLiteStore
    every_store = {"FileStore", "MemoryStore", "PostgresStore", "RedisStore", "SQLiteStore"}
    assert every_store | {"store_from_url"} <= set(mqtt_persist.__all__)
    assert every_store <= set(stores.__all__)
    for name in every_store:  # what __all__ promises, ``from mqtt_persist import *`` finds
        assert getattr(mqtt_persist, name) is getattr(stores, name)
    # ... and importing the package still needs neither redis-py, psycopg nor click.
    probe = (
        "import sys, mqtt_persist, mqtt_persist.cli, mqtt_persist.cli.session_file; "
        "print(sorted(m for m in ('redis', 'click', 'psycopg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_memory_file_and_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(store_from_url("memory://"), MemoryStore)
    assert isinstance(store_from_url("memory:"), MemoryStore)

    store = store_from_url(f"file://{tmp_path}/sessions%20dir?fsync=false")
    assert isinstance(store, FileStore)
    assert store.directory == tmp_path / "sessions dir"
    assert store._fsync is False
    assert store_from_url(f"file://localhost{tmp_path}")._fsync is True  # type: ignore[attr-defined]

    monkeypatch.chdir(tmp_path)
    relative = store_from_url("file:here/sessions")
    assert isinstance(relative, FileStore) and relative.directory == tmp_path / "here/sessions"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store_from_url("file:~/s").directory == tmp_path / "home/s"  # type: ignore[attr-defined]

    db = store_from_url(f"sqlite://{tmp_path}/a.db?synchronous=normal&busy_timeout=2.5")
    assert isinstance(db, SQLiteStore)
    assert (db.path, db._synchronous, db._busy_timeout) == (tmp_path / "a.db", "NORMAL", 2.5)
    assert store_from_url("sqlite:b.db").path == tmp_path / "b.db"  # type: ignore[attr-defined]
    assert store_from_url(f"sqlite:{tmp_path}/c.db").path == tmp_path / "c.db"  # type: ignore[attr-defined]


def test_redis() -> None:
    pytest.importorskip("redis", reason="redis-py not installed")
    from mqtt_persist import RedisStore

    store = store_from_url("redis://user:pw@10.0.0.1:6380/3?prefix=gw&lease_ttl=5&socket_timeout=2")
    assert isinstance(store, RedisStore)
    # Our options are taken out; redis-py's own stay in the URL it gets.
    assert store._url == "redis://user:pw@10.0.0.1:6380/3?socket_timeout=2"
    assert (store._prefix, store._lease_ttl) == ("gw", 5.0)
    assert "pw" not in repr(store)
    tls = store_from_url("rediss://h/0?ssl_cert_reqs=none")
    assert tls._url == "rediss://h/0?ssl_cert_reqs=none"  # type: ignore[attr-defined]


def test_postgres() -> None:
    pytest.importorskip("psycopg", reason="psycopg not installed")
    from mqtt_persist import PostgresStore

    store = store_from_url(
        "postgresql://user:pw@10.0.0.1:5433/db?schema=gw&lease_ttl=5&max_connections=2"
        "&sslmode=require&application_name=gateway%207"
    )
    assert isinstance(store, PostgresStore)
    # Our options are taken out; libpq's own stay in the DSN it gets.
    assert store._pool._dsn == (
        "postgresql://user:pw@10.0.0.1:5433/db?sslmode=require&application_name=gateway%207"
    )
    assert (store.schema, store._lease_ttl, store._pool._size) == ("gw", 5.0, 2)
    assert "pw" not in repr(store) and "pw" not in store.dsn
    # postgres:// too, and a Unix socket: no host, libpq's host parameter instead.
    socket = store_from_url("postgres:///db?host=/var/run/postgresql")
    assert socket._pool._dsn == "postgresql:///db?host=/var/run/postgresql"  # type: ignore[attr-defined]
    assert socket.schema == "mqtt_persist"  # type: ignore[attr-defined]


async def test_a_postgres_url_reaches_the_store(tmp_path: Path) -> None:
    from tests.support.postgres import shared_postgres_url, unique_schema
    from tests.test_stores import msg

    url = f"{shared_postgres_url()}?schema={unique_schema(tmp_path)}&lease_ttl=2"
    async with store_from_url(url) as store:  # type: ignore[attr-defined]
        await store.acquire("a")
        await store.apply("a", [MessageAdded(msg(1))])
        state = await store.load("a")
        assert state is not None and list(state.messages) == [1]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/var/lib/x", "needs a scheme"),
        ("C:\\sessions", "needs a scheme"),
        ("mysql://h/db", "unknown store URL scheme 'mysql'"),
        ("memory://somewhere", "no host or path"),
        ("file://otherhost/x", "not one on host 'otherhost'"),
        ("file://", "names no directory"),
        ("file:///x#frag", "no #fragment"),
        ("file:///x?fsync=maybe", "option 'fsync' must be true or false, not 'maybe'"),
        ("file:///x?fsnyc=false", "unknown option fsnyc for a file: store"),
        ("file:///x?fsync=true&fsync=false", "given twice"),
        ("file:///x?fsync=", "has no value"),
        ("sqlite:////var/x.db", "four slashes"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite::memory:", "memory://"),
        ("sqlite:///x.db?synchronous=OFF", "one of FULL, NORMAL, EXTRA"),
        ("sqlite:///x.db?busy_timeout=-1", "must be a number > 0"),
        ("sqlite:///x.db?busy_timeout=nan", "must be a number > 0"),
        ("redis://:secret@h:99999/0", "Port out of range"),
        ("redis://:secret@/0", "needs a host"),
        ("redis://:secret@h/zero", "must be a number, not 'zero'"),
        ("redis://:secret@h/0?prefix=p&nope=1", "unknown option nope"),
        ("redis://:secret@h/0?lease_ttl=0", "'lease_ttl' must be a number > 0"),
        ("redis://:secret@h/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("postgresql://:secret@h:99999/db", "Port out of range"),
        ("postgresql://:secret@h/db?schema=a&nope=1", "unknown option nope for a postgresql:"),
        ("postgres://:secret@h/db?max_connections=0", "must be a number >= 1"),
        ("postgresql://:secret@h/db?max_connections=1.5", "must be a whole number"),
        ("postgresql://:secret@h/db?lease_ttl=-2", "'lease_ttl' must be a number > 0"),
    ],
)
def test_bad_urls_are_refused_by_name(url: str, message: str) -> None:
    if url.startswith("redis") and "Port" not in message:
        pytest.importorskip("redis", reason="redis-py not installed")
    if url.startswith("postgres") and "Port" not in message:
        pytest.importorskip("psycopg", reason="psycopg not installed")
    with pytest.raises(InvalidInput) as caught:
        store_from_url(url)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_adding_a_scheme_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCHEMES, "mem2", "mqtt_persist.stores.urls:memory_store")
    assert isinstance(store_from_url("mem2://"), MemoryStore)
    for target in SCHEMES.values():
        module, _, name = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name)), target


def test_a_factory_reads_only_the_options_it_knows() -> None:
    parsed = StoreURL("xy://h/?a=1&b=yes&c=2.5&d=Two")
    assert parsed.option_float("a", 0.0) == 1.0
    assert parsed.option_bool("b", False) is True
    assert parsed.option_choice("d", ("One", "Two"), "One") == "Two"
    assert parsed.option_str("missing", "default") == "default"
    with pytest.raises(
        InvalidInput, match=r"unknown option c for a xy: store.*its options: a, b, d"
    ):
        parsed.done()
    assert urls.redact_url(parsed.text) == parsed.text


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://u:p%40ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("rediss://user@h/0", "rediss://user@h/0"),
        ("x://h/?password=pw&prefix=a", "x://h/?password=***&prefix=a"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("redis://u:pw@h:notaport/0", "redis://u:***@h:notaport/0"),
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe
