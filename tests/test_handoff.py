"""Session handoff between processes, end to end: a real mosquitto, a real shared store, an
independent paho subscriber.

Process A owns session S (one client id, one store) and streams QoS 1/2 messages. Then:

- pause: A is SIGSTOPped; once its lease lapsed (seen at the store's server), process B starts
  with the same client id and store and takes the session over (mosquitto drops A's connection
  when B connects); B streams, then A is SIGCONTed. A must neither write to the store nor
  deliver a PUBLISH it could not store: its first write is refused (SessionFenced) and the
  client stops before it sends anything, including the CONNECT of a reconnect, which would
  take the client id's connection back from B.
- kill: A is SIGKILLed and B takes over at once (a dead holder on this host).

Counted at the subscriber: every message A or B reported accepted arrives (0 lost), no QoS 2
message arrives twice, and no message A published after the takeover arrives. Counted at A:
every write A started after SIGCONT was refused (``W!``), none accepted (``W=``). For
PostgreSQL also at the server: a test-only trigger records which process (its
``application_name``) wrote to the session's tables, and nothing from A follows B's takeover.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.observer import PahoObserver
from tests.support.store_kill import REPO_ROOT, child_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CLIENT_ID = "handoff-gateway"
#: Short enough to keep the test quick, long enough that a loaded machine's stalls (renewals
#: run every third of it) do not lose the lease of a running owner.
LEASE_TTL = 3.0
TIMEOUT = 60.0


@dataclass
class Child:
    """A handoff child and every line it printed, in order, read by a thread."""

    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self.changed:
                self.lines.append(raw.decode().strip())
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<EOF>")
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.lines), TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}; last lines {self.lines[-5:]}")

    def oks(self, lines: list[str] | None = None) -> list[int]:
        return [
            int(line[3:]) for line in (self.lines if lines is None else lines) if line[:3] == "OK "
        ]


def start_child(
    broker: MosquittoBroker, store: str, tag: str, start: int, count: int, *extra: str
) -> Child:
    """Start a handoff child; its stderr goes to the test's output (shown when it fails)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.handoff_child", broker.host, str(broker.port),
         store, CLIENT_ID, tag, str(start), str(count), "--lease-ttl", str(LEASE_TTL), *extra],
        stdout=subprocess.PIPE, stderr=None, env=child_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    child = Child(process)
    assert process.stdout is not None
    threading.Thread(target=child.read, args=(process.stdout,), daemon=True).start()
    return child


def wait_or_dump(process: subprocess.Popen[bytes]) -> int | None:
    """The child's exit status; if it hangs, its tasks' stacks on stderr (SIGUSR1), and None."""
    try:
        return process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        return None


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2] in "Tt"


# --- the two shared stores, with a way to see the lease lapse at the server ---------------------


@dataclass
class SharedStore:
    spec: str
    lease_lapsed: Callable[[], bool]
    #: Which processes wrote after the takeover (PostgreSQL only; None: not recorded).
    writers_after_takeover: Callable[[int], set[str]] | None = None


def redis_store(tmp_path: Path) -> Iterator[SharedStore]:
    pytest.importorskip("redis")
    import redis

    from tests.support.redis_server import shared_redis_url, unique_prefix

    url, prefix = shared_redis_url(), unique_prefix(tmp_path)
    raw = redis.Redis.from_url(url)
    lease = f"{prefix}:lease:{CLIENT_ID}".encode()
    try:
        yield SharedStore(f"redis:{url}#{prefix}", lambda: not raw.exists(lease))
    finally:
        raw.close()


_AUDIT = """
CREATE TABLE {s}.audit (id bigserial, app text, tab text, op text, at timestamptz);
CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.audit (app, tab, op, at)
    VALUES (current_setting('application_name'), TG_TABLE_NAME, TG_OP, clock_timestamp());
    RETURN NULL;
END $$;
"""
_AUDITED = ("leases", "sessions", "messages", "inbound", "subscriptions", "set_aside")


def postgres_store(tmp_path: Path) -> Iterator[SharedStore]:
    from tests.support.postgres import shared_postgres_dsn, unique_schema

    dsn, schema = shared_postgres_dsn(), unique_schema(tmp_path)
    import psycopg
    from psycopg import sql

    from mqtt_persist.stores.postgres.schema import prepare_schema

    async def create() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await prepare_schema(conn, schema)

    import asyncio

    asyncio.run(create())
    s = sql.Identifier(schema)
    conn = psycopg.connect(dsn, autocommit=True)
    # Test-only: every row written in the session's tables leaves an audit row naming the
    # process (each store connection's application_name is "mqtt_persist pid N").
    conn.execute(sql.SQL(_AUDIT).format(s=s))
    for table in _AUDITED:
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {s}.{t} "
                "FOR EACH ROW EXECUTE FUNCTION {s}.audit()"
            ).format(s=s, t=sql.Identifier(table))
        )

    def lapsed() -> bool:
        row = conn.execute(
            sql.SQL("SELECT expires_at <= clock_timestamp() FROM {}.leases").format(s)
        ).fetchone()
        return row is None or bool(row[0])

    def writers_after_takeover(b_pid: int) -> set[str]:
        # B's takeover is its first write of the lease row; list who wrote anything after it.
        rows = conn.execute(
            sql.SQL(
                "SELECT DISTINCT app FROM {s}.audit WHERE id > (SELECT min(id) FROM {s}.audit "
                "WHERE app = %s AND tab = 'leases')"
            ).format(s=s),
            (f"mqtt_persist pid {b_pid}",),
        ).fetchall()
        return {app for (app,) in rows}

    try:
        yield SharedStore(f"postgres:{dsn}#{schema}", lapsed, writers_after_takeover)
    finally:
        conn.close()


STORES = {"redis": redis_store, "postgres": postgres_store}


@pytest.fixture(params=sorted(STORES))
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedStore]:
    yield from STORES[request.param](tmp_path)


# --- the story ----------------------------------------------------------------------------------


def check_deliveries(observer: PahoObserver, accepted: set[str], a_limit: int) -> None:
    """0 lost, 0 QoS 2 duplicates, and nothing from A beyond what it published before the
    takeover (``a_limit``: the last message A's publish() was busy with when it stopped)."""
    assert observer.wait_until(lambda: {p.decode() for p in observer.payloads()} >= accepted, 30), (
        f"lost: {sorted(accepted - {p.decode() for p in observer.payloads()})[:20]}"
    )
    q2 = Counter(p.decode() for p in observer.payloads("handoff/q2"))
    assert [p for p, n in q2.items() if n > 1] == [], "QoS 2 delivered more than once"
    late = [p for p in {p.decode() for p in observer.payloads()} if p.startswith("A:")]
    assert all(int(p[2:]) <= a_limit for p in late), "A published after the takeover"


@pytest.mark.parametrize("how", ["pause", "kill"])
def test_handoff_loses_nothing_and_fences_the_former_owner(
    how: str, broker: MosquittoBroker, shared_store: SharedStore
) -> None:
    with PahoObserver(broker.host, broker.port, "handoff/#", qos=2) as observer:
        a = start_child(broker, shared_store.spec, "A", 0, 1_000_000)
        try:
            a.wait_for(lambda lines: len(a.oks(lines)) >= 200, "A to publish 200 messages")
            if how == "pause":
                a.process.send_signal(signal.SIGSTOP)
                deadline = time.monotonic() + TIMEOUT
                while not is_stopped(a.process.pid):  # the signal lands asynchronously
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                # Seen at the store's server: A could not renew, its lease lapsed.
                while not shared_store.lease_lapsed():
                    assert time.monotonic() < deadline, "A's lease never lapsed"
                    time.sleep(0.05)
            else:
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(TIMEOUT)
            a.wait_for(lambda lines: bool(lines), "A's output")  # the reader caught up below
            a_last = max(a.oks(), default=-1)
            b = start_child(broker, shared_store.spec, "B", a_last + 1, a_last + 401, "--drain")
            b.wait_for(lambda lines: len(b.oks(lines)) >= 100, "B to take over and publish")
            a_seen = len(a.lines)  # A is stopped or dead: everything it printed is read
            if how == "pause":
                a.process.send_signal(signal.SIGCONT)
                assert wait_or_dump(a.process) == 3, "A did not stop on its fenced write"
                a.wait_for(lambda lines: lines[-1] == "<EOF>", "A's last line")
                after = a.lines[a_seen:]
                started = [line.split()[1] for line in after if line.startswith("W+")]
                accepted = [line.split()[1] for line in after if line.startswith("W=")]
                refused = [line for line in after if line.startswith("W!")]
                # Only a write A had begun before it stopped may still report success (the
                # server ran it before the takeover: later, it is refused); every write A began
                # after SIGCONT was refused as fenced.
                before = {line.split()[1] for line in a.lines[:a_seen] if line.startswith("W+")}
                assert set(accepted) <= before, after
                assert all(
                    any(r.split()[1] == n and "SessionFenced" in r for r in refused)
                    for n in started
                ), after
                # A stops on its first write after SIGCONT (fenced), or, when the pause caught
                # that write inside its transaction, on that write: PostgreSQL ended the
                # transaction A left idle (nothing of it was stored), and its connection.
                fatal = [line for line in after if line.startswith("FATAL")]
                assert len(fatal) == 1, after
                assert fatal[0].startswith("FATAL SessionFenced") or (
                    not started and fatal[0].startswith("FATAL StoreError")
                ), after
                assert a.oks(after) in ([], [a_last + 1]), "A accepted publishes after SIGCONT"
            b.wait_for(lambda lines: "DRAINED" in lines, "B to drain")
            assert b.process.wait(TIMEOUT) == 0
            accepted_msgs = {f"A:{i}" for i in a.oks()} | {f"B:{i}" for i in b.oks()}
            check_deliveries(observer, accepted_msgs, a_last + 1)
            if shared_store.writers_after_takeover is not None:
                writers = shared_store.writers_after_takeover(b.process.pid)
                assert writers == {f"mqtt_persist pid {b.process.pid}"}, writers
        finally:
            for child in (a,):
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGCONT)
                    child.process.kill()
                    child.process.wait()
    print(f"{how}: A accepted {len(a.oks())}, B accepted {len(b.oks())}")
