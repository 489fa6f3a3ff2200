"""The README's first command, the phase 1-3 demo, really works (and fails when it should)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "persistent_session.py"

pytestmark = pytest.mark.broker


def run_demo(*args: str, path_extra: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{path_extra}{os.environ.get('PATH', '')}:/usr/sbin"}
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def test_demo_with_its_own_private_mosquitto(mosquitto_path: str) -> None:
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for phase in ("Phase 1", "Phase 2", "Phase 3"):
        assert phase in out
    assert out.count("received") == 4  # the test message and the three queued ones
    assert out.strip().splitlines()[-1] == "RESULT: OK - all 3 queued messages arrived, in order"


def test_demo_against_a_given_broker(broker: MosquittoBroker) -> None:
    result = run_demo("--broker", broker.url, "--client-id", "demo-given-broker")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: OK" in result.stdout


def test_demo_fails_loudly_when_the_broker_forgets_queued_messages(
    broker_factory: object,
) -> None:
    # mosquitto with max_queued_messages 1 keeps only one of the three offline messages.
    broker: MosquittoBroker = broker_factory(extra_config="max_queued_messages 1\n")  # type: ignore[operator]
    result = run_demo("--broker", broker.url, "--client-id", "demo-lossy-broker", "--timeout", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RESULT: FAILED" in result.stdout


def test_demo_rejects_a_bad_broker_url() -> None:
    result = run_demo("--broker", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "mqtt://HOST:PORT" in result.stderr


def test_demo_against_no_broker_says_so_in_one_line() -> None:
    """Regression: a 30-line traceback ending in a bare TimeoutError, naming nothing."""
    port = free_port()  # nothing listens there
    result = run_demo("--broker", f"mqtt://127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "within 1s" in lines[0], lines
    assert "connection refused" in lines[0], lines
