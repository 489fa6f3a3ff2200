"""The application examples run for real (issue 11): examples/edge_gateway.py under SIGKILL,
examples/sensor_device.py through broker outages.

The gateway runs as a child process between two private mosquittos; paho publishes on the
local one and a paho observer counts what arrives on the upstream one. The gateway is
SIGKILLed again and again while it forwards the backlog: every message must arrive upstream,
QoS 2 exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support.broker import BrokerFactory
from tests.support.children import spawn_ready
from tests.support.observer import PahoObserver, paho_publish_async

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "examples" / "edge_gateway.py"


#: The gateways' log lines (stderr, read as they come so that no pipe fills), for failures.
LOG: list[str] = []


async def _drain(stream: asyncio.StreamReader | None, tag: str) -> None:
    assert stream is not None
    async for raw in stream:
        LOG.append(f"{tag} {raw.decode(errors='replace').rstrip()}")


async def start_gateway(local: str, upstream: str, store: Path) -> asyncio.subprocess.Process:
    process = await spawn_ready(
        sys.executable, str(GATEWAY), "--local", local, "--upstream", upstream,
        "--store", str(store), what="gateway",
    )  # fmt: skip
    tag = f"[{process.pid}]"
    for stream in (process.stdout, process.stderr):
        asyncio.get_running_loop().create_task(_drain(stream, tag))
    return process


async def stop(process: asyncio.subprocess.Process, sig: int) -> None:
    if process.returncode is None:
        process.send_signal(sig)
    await asyncio.wait_for(process.wait(), 30)


async def test_gateway_survives_repeated_sigkills_without_loss_or_qos2_duplicates(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    local, upstream = broker_factory(), broker_factory()
    store = tmp_path / "gateway"
    q2 = [f"q2-{i}".encode() for i in range(300)]
    q1 = [f"q1-{i}".encode() for i in range(100)]
    kills = 6
    with PahoObserver(upstream.host, upstream.port, "sensors/#", qos=2) as observer:
        gateway = await start_gateway(local.url, upstream.url, store)
        # The gateway's local session exists (subscribed) before anything is published.
        publishing = asyncio.gather(
            paho_publish_async(local.host, local.port, "sensors/q2", q2, 2, timeout=60),
            paho_publish_async(local.host, local.port, "sensors/q1", q1, 1, timeout=60),
        )
        killed_at: list[int] = []
        for _ in range(kills):
            seen = observer.count()
            # Mid-stream: once this gateway forwarded something, at a random moment after.
            assert await observer.await_until(lambda s=seen: observer.count() >= s + 10, 60)
            await asyncio.sleep(random.uniform(0, 0.2))
            killed_at.append(len(set(observer.payloads())))  # distinct: QoS 1 may repeat
            await stop(gateway, signal.SIGKILL)
            gateway = await start_gateway(local.url, upstream.url, store)
        await publishing
        everything = set(q2 + q1)
        try:
            # mosquitto may reorder deliveries after reconnects, so wait for every message
            # itself; then a marker gives late duplicates their chance to show.
            arrived_all = await observer.await_until(
                lambda: everything <= set(observer.payloads()), 120
            )
            await paho_publish_async(local.host, local.port, "sensors/q2", [b"end"], 2)
            ended = await observer.await_until(lambda: b"end" in observer.payloads(), 60)
            assert arrived_all and ended, "\n".join(LOG[-60:])
        finally:
            await stop(gateway, signal.SIGINT)
        arrived = Counter(observer.payloads())
    repeats = sum(n - 1 for n in arrived.values())
    print(f"kills at upstream counts {killed_at}; {sum(arrived.values())} arrived, "
          f"{repeats} QoS 1 repeats")  # fmt: skip
    # The kills must hit the stream, or the test proves nothing. A fast gateway may finish
    # before the last of them (it did in a loaded run: 401 arrivals counted with a QoS 1
    # repeat); at least half must land mid-stream.
    mid_stream = [k for k in killed_at if k < len(q1) + len(q2)]
    assert len(mid_stream) >= kills // 2, f"kills at {killed_at}: the stream ended first"
    missing = [p for p in q2 + q1 if arrived[p] == 0]
    assert not missing, missing[:20]
    twice = [p for p in q2 if arrived[p] > 1]
    assert not twice, twice  # QoS 2: exactly once end to end


SENSOR = ROOT / "examples" / "sensor_device.py"


async def test_sensor_device_keeps_publishing_through_a_broker_outage(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    # The broker keeps the observer's session across its own restart (persistence, SIGTERM).
    broker = broker_factory(persistence=True)
    total = 150
    with PahoObserver(
        broker.host, broker.port, "sensors/#", qos=1, client_id="sensor-observer",
        clean_session=False,
    ) as observer:  # fmt: skip
        device = await asyncio.create_subprocess_exec(
            sys.executable, str(SENSOR), "--broker", broker.url, "--store",
            str(tmp_path / "sensor"), "--interval", "0.02", "--count", str(total),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert device.stdout is not None
        stored: list[int] = []
        done: list[str] = []

        async def read() -> None:
            assert device.stdout is not None
            async for raw in device.stdout:
                word, _, rest = raw.decode().strip().partition(" ")
                if word == "STORED":
                    stored.append(int(rest))
                elif word == "DONE":
                    done.append(rest)

        reader = asyncio.create_task(read())
        assert await observer.await_until(lambda: observer.count() >= 20, 30)
        broker.stop()
        outage_from = len(stored)
        # The loop keeps its pace while the broker is down: readings go to the store.
        for _ in range(500):
            if len(stored) >= outage_from + 30:
                break
            await asyncio.sleep(0.02)
        assert len(stored) >= outage_from + 30, (outage_from, len(stored))
        broker.start()
        try:
            await asyncio.wait_for(device.wait(), 60)
        finally:
            if device.returncode is None:
                device.kill()
            await reader
        assert device.returncode == 0, (await device.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
        assert done and done[0].startswith(f"{total} "), done
        assert await observer.await_until(lambda: observer.count() >= total, 30)
        numbers = {json.loads(p)["n"] for p in observer.payloads()}
    assert numbers == set(range(total))  # every reading, the outage's included
