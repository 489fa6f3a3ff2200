"""``mqtt-persist pub``, ``sub`` and ``demo`` against a real mosquitto, observed by paho.

Also where the CLI must refuse a session a live client holds (here the client is a running
``sub``), and must never print a password.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from mqtt_persist.cli.session_file import Header, encode_header
from mqtt_persist.session.state import SessionState
from tests.support.broker import BrokerFactory, MosquittoBroker, free_port
from tests.support.cli import Result, run_cli, start_cli
from tests.support.observer import PahoObserver, paho_publish
from tests.support.redis_server import shared_redis_url, unique_prefix
from tests.test_cli_sessions import one_line_error, with_store

pytestmark = pytest.mark.broker


def load(url: str, client_id: str) -> SessionState | None:
    return with_store(url, lambda store: store.load(client_id))


def test_pub_stores_with_the_broker_down_and_a_later_run_sends(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = f"sqlite://{tmp_path / 'edge.db'}"
    down = str(free_port())  # nothing listens there
    common = ["--store", store, "-i", "edge-1", "-t", "edge/data"]
    with PahoObserver(broker.host, broker.port, "edge/#", qos=2) as observer:
        # Broker down: exit 0 once the messages are in the store, saying they are queued.
        first = run_cli("pub", *common, "-m", "one", "-m", "two", "--port", down, "--linger", "0")
        assert first.code == 0, first
        assert "stored 2 message(s)" in first.out and "2 queued in the store" in first.out
        assert "not reached" in first.out

        # Lines of stdin (a blank one skipped); --wait-ack gives up after --timeout: exit 6,
        # and the messages stay stored.
        second = run_cli(
            "pub", *common, "-l", "--port", down, "--wait-ack", "--timeout", "0.3", "--json",
            input=b"three\n\nfour\r\nfive",
        )  # fmt: skip
        assert second.code == 6, second
        report = second.json()
        assert (report["stored"], report["acknowledged"], report["timed_out"]) == (3, 0, True)
        assert report["unsent"] == 5

        state = load(store, "edge-1")
        assert state is not None
        assert [m.payload for m in state.messages.values()] == [
            b"one", b"two", b"three", b"four", b"five"
        ]  # fmt: skip
        assert observer.messages == []

        # The broker is reachable: this run sends the earlier runs' messages first, in order.
        third = run_cli(
            "pub", *common, "-m", "six", "-q", "2", "--port", str(broker.port), "--wait-ack",
            "--json", "--protocol", "3.1.1",
        )  # fmt: skip
        assert third.code == 0, third
        assert third.json() | {"connected": True} == {
            "client_id": "edge-1",
            "stored": 1,
            "acknowledged": 1,
            "downgraded": 0,
            "not_acknowledged": [],
            "timed_out": False,
            "unsent": 0,
            "connected": True,
        }
        assert observer.wait_for(6), observer.messages
        assert observer.payloads() == [b"one", b"two", b"three", b"four", b"five", b"six"]
        assert [m.qos for m in observer.messages] == [1, 1, 1, 1, 1, 2]
        sent = load(store, "edge-1")
        assert sent is not None and not sent.messages and sent.protocol_version == 4


def test_sub_prints_a_persistent_session_and_holds_it(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = (tmp_path / "sessions").as_uri()
    common = ["--store", store, "-i", "reader", "--port", str(broker.port), "--protocol", "5"]

    # The first run subscribes (kept by the broker and the store) and ends at --timeout.
    first = run_cli("sub", *common, "-t", "news/#", "-q", "2", "--timeout", "0.2")
    assert first.code == 0, first

    # Published while no sub runs: the broker queues them for the session.
    paho_publish(broker.host, broker.port, "news/a", [b"hello", b"\xff\xfe binary"], qos=1)
    paho_publish(broker.host, broker.port, "news/b", ["grüße".encode()], qos=2)

    running = start_cli("sub", *common, "-F", "json")
    try:
        assert running.stdout is not None
        lines = [running.stdout.readline() for _ in range(3)]

        # It holds the session: no other command may change it meanwhile.
        export = tmp_path / "reader.jsonl"
        export.write_bytes(encode_header(Header("reader", 4, None, 0, time.time())))
        for args in (
            ["sessions", "delete", "reader", "--yes", "--store", store],
            ["sessions", "import", export, "--replace", "--store", store],
            ["pub", *common, "-t", "x", "-m", "y"],
        ):
            one_line_error(run_cli(*args), 3, "reader", "held")

        paho_publish(broker.host, broker.port, "news/c", [b"live"], qos=1)
        lines.append(running.stdout.readline())
        running.send_signal(signal.SIGINT)
        assert running.wait(10) == 0  # Ctrl-C is how sub ends
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    printed = [json.loads(line) for line in lines]
    assert (load(store, "reader") or SessionState("?")).protocol_version == 5
    assert [(p["topic"], p["qos"]) for p in printed] == [
        ("news/a", 1), ("news/a", 1), ("news/b", 2), ("news/c", 1)
    ]  # fmt: skip
    assert printed[0]["payload"] == "hello"
    assert base64.b64decode(printed[1]["payload_base64"]) == b"\xff\xfe binary"
    assert printed[2]["payload"] == "grüße" and printed[3]["payload"] == "live"

    # --count: the next message, as "topic payload", then exit 0.
    paho_publish(broker.host, broker.port, "news/d", [b"later"], qos=1)
    counted = run_cli("sub", *common, "-F", "topic", "-C", "1", "--timeout", "10")
    assert (counted.code, counted.out) == (0, "news/d later\n"), counted

    # --count never loses what arrived past it: acknowledged only once printed, the rest
    # comes again with the next run.
    paho_publish(broker.host, broker.port, "news/e", [b"e1", b"e2", b"e3"], qos=2)
    first = run_cli("sub", *common, "-F", "topic", "-C", "1", "--timeout", "10")
    assert (first.code, first.out) == (0, "news/e e1\n"), first
    rest = run_cli("sub", *common, "-F", "topic", "-C", "2", "--timeout", "10")
    assert (rest.code, rest.out) == (0, "news/e e2\nnews/e e3\n"), (first, rest)


def test_no_password_in_any_output(broker: MosquittoBroker, tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="redis-py not installed")
    secret = "S3cr3t-pw%"
    quoted = "S3cr3t-pw%25"  # as written inside a URL
    redis = shared_redis_url().replace("redis://", f"redis://nobody:{quoted}@")
    prefix = unique_prefix(tmp_path)
    pub = ["pub", "--store", (tmp_path / "s").as_uri(), "-i", "p", "-t", "t", "-m", "x"]
    runs: list[Result] = [
        # The store refuses the credentials: a one-line error, with --debug a traceback.
        run_cli("--debug", "sessions", "list", "--store", f"{redis}?prefix={prefix}"),
        # A bad store URL: a usage error that quotes the URL.
        run_cli("sessions", "list", "--store", f"{redis}?prefix={prefix}&nope=1"),
        # Broker credentials, with every log line shown.
        run_cli("--debug", *pub, "-p", str(broker.port), "-u", "alice", "-P", secret, "--wait-ack"),
        # ... from the environment, with the broker down.
        run_cli(
            "-v",
            *pub,
            *("--port", str(free_port()), "--linger", "0.3"),
            env={"MQTT_PERSIST_USERNAME": "alice", "MQTT_PERSIST_PASSWORD": secret},
        ),
    ]
    assert [r.code for r in runs] == [1, 2, 0, 0], runs
    assert "Traceback" in runs[0].err and "nobody:***@" in runs[0].err
    assert "nobody:***@" in runs[1].err
    for result in runs:
        for text in (result.out, result.err):
            assert secret not in text and quoted not in text and "S3cr3t" not in text, result


def test_demo_command(broker: MosquittoBroker, tmp_path: Path) -> None:
    result = run_cli(
        "demo", "--broker", broker.url, "-i", "demo-cli", "--store", f"sqlite:{tmp_path}/d.db"
    )
    assert result.code == 0, result
    assert result.out.count("received") == 4
    assert result.out.strip().splitlines()[-1].startswith("RESULT: OK")


def test_demo_command_against_no_broker_says_so_in_one_line() -> None:
    port = free_port()  # nothing listens there
    result = run_cli("demo", "--broker", f"mqtt://127.0.0.1:{port}", "--timeout", "1")
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith(f"mqtt-persist: error: could not connect to 127.0.0.1:{port}")
    assert "within 1s" in lines[0] and "connection refused" in lines[0], lines


def test_sub_says_once_that_it_waits_for_a_broker_that_is_down(tmp_path: Path) -> None:
    """It waited silently, retrying, as if connected to a broker with nothing to say."""
    with socket.socket() as bound:  # bound, never listening: every connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        started = time.monotonic()
        result = run_cli(
            "sub", "--store", (tmp_path / "s").as_uri(), "-i", "w", "-t", "t",
            "--port", str(port), "--timeout", "3",
        )  # fmt: skip
    assert result.code == 0 and result.out == "", result
    assert time.monotonic() - started >= 3  # several attempts failed meanwhile (backoff 0.5 s..)
    lines = result.err.splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith(f"mqtt-persist: waiting for the broker 127.0.0.1:{port}"), result
    assert "connection refused" in lines[0], result


def test_a_refusing_broker_is_one_line_on_stderr(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    """The client logs why it stopped, and the command then fails with that same error: the
    log record must not make it two lines (docs/cli.md: exactly one line on stderr)."""
    broker = broker_factory(extra_config="allow_anonymous false\n")
    common = ["--store", (tmp_path / "s").as_uri(), "--port", str(broker.port)]
    for args in (
        ["pub", *common, "-i", "p", "-t", "t", "-m", "x", "--wait-ack", "--timeout", "10"],
        ["pub", *common, "-i", "p", "-t", "t", "-m", "x", "--linger", "10"],
        ["sub", *common, "-i", "s", "-t", "t", "--timeout", "10"],
    ):
        one_line_error(run_cli(*args, timeout=20), 1, "not authorized")


def test_pub_of_nothing_with_the_broker_down_claims_no_acknowledgement(tmp_path: Path) -> None:
    """Empty stdin stores nothing, and nothing is queued: that is no reason to say the
    messages were "sent and acknowledged" by a broker that was never reached."""
    result = run_cli(
        "pub", "--store", (tmp_path / "s").as_uri(), "-i", "e", "-t", "t", "-l",
        "--port", str(free_port()), "--linger", "0", input=b"",
    )  # fmt: skip
    assert result.code == 0, result
    assert "stored 0 message(s)" in result.out and "acknowledged" not in result.out, result


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_pub_interrupted_while_waiting_for_acks_keeps_what_it_stored(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM during --wait-ack: exit 130 at once with one line, no traceback, and
    the messages already stored stay in the store for the next run."""
    store = (tmp_path / "s").as_uri()
    running = start_cli(
        "pub", "--store", store, "-i", "edge", "-t", "t", "-m", "a", "-m", "b", "-q", "2",
        "--port", str(free_port()), "--wait-ack", "--timeout", "30",
    )  # fmt: skip
    try:

        def stored() -> bool:
            listed = with_store(store, lambda s: s.list_sessions())
            return any(i.client_id == "edge" and i.queued + i.inflight == 2 for i in listed)

        # A sync poll: with_store runs its own event loop.
        deadline = time.monotonic() + 10
        while not stored():
            assert time.monotonic() < deadline, "the messages were never stored"
            time.sleep(0.02)
        running.send_signal(sig)
        assert running.wait(5) == 130
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.stderr is not None
    err = running.stderr.read().decode()
    assert err == f"mqtt-persist: error: interrupted by {sig.name}\n", err
    state = load(store, "edge")
    assert state is not None
    assert [m.payload for m in state.messages.values()] == [b"a", b"b"]
