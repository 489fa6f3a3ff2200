"""SIGKILL cycles of a publishing child process, counted by an independent paho subscriber.

Shared by the crash tests, ``benchmarks/crash_figures.py`` and ``benchmarks/fault_matrix.py``.
One run: start the child on a durable store, wait until it reported its first accepted message,
let it SIGKILL itself once it accepted a random number of messages, start it again on the same
store from the message after the last one it reported accepted, ``cycles`` times; then
let a last child finish and drain. Counting accepted messages (events, not time) makes every
kill land while a child is publishing, however fast the child or slow the machine;
``accepted_per_kill`` records how many each killed child had accepted. Every message
``publish()`` returned for must arrive (QoS 1 at least once, QoS 2 exactly once), in order
per topic.

Exactly one message per kill may legitimately be published twice *by the test*: the one whose
``publish()`` had stored it but not yet returned when the kill landed; the next child, starting
from the last reported message, publishes it again as a new message. Those kill-boundary
indices are excluded from the duplicate count and reported separately.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.support.observer import PahoObserver
from tests.support.proxy import ThreadedProxy
from tests.support.tally import wire_order_violations
from tests.support.ws_bridge import ThreadedBridge

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CrashFigures:
    """What one run of kill cycles measured."""

    store: str
    kills: int = 0
    accepted: int = 0
    arrived: int = 0
    lost: list[int] = field(default_factory=list)
    qos2_duplicates: list[int] = field(default_factory=list)
    boundary_repeats: int = 0
    #: Messages the subscriber got out of order per topic: a figure only, since mosquitto
    #: itself may reorder deliveries after reconnects (DESIGN.md, broker facts).
    out_of_order: int = 0
    #: PUBLISH packets out of order per connection and topic on the wire, as the children
    #: wrote them (seen by an MQTT proxy between them and the broker): must be none.
    wire_out_of_order: list[str] = field(default_factory=list)
    #: Messages each killed child reported accepted before its SIGKILL (one entry per kill).
    accepted_per_kill: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.qos2_duplicates and not self.wire_out_of_order


def _front(
    recorder: ThreadedProxy, transport: str
) -> contextlib.AbstractContextManager[ThreadedProxy | ThreadedBridge]:
    """Where the children connect: the recording proxy, or a WebSocket bridge in front of it."""
    if transport == "websockets":
        return ThreadedBridge(recorder.host, recorder.port)
    return contextlib.nullcontext(recorder)


def _child(host: str, port: int, store: str, client_id: str, start: int, total: int,
           *extra: str) -> list[str]:  # fmt: skip
    return [sys.executable, "-m", "tests.support.publisher_child", host, str(port), store,
            client_id, str(start), str(total), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    # gmqtt installs a top-level "tests" package; ours must win for the child.
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _collect(stream: IO[bytes], into: list[int], first: threading.Event) -> None:
    for raw in stream:
        line = raw.decode().strip()
        if line.startswith("OK "):
            into.append(int(line[3:]))
            first.set()
    first.set()  # EOF: the child is gone; nobody must wait for a first message any more


def _out_of_order(payloads: list[bytes]) -> int:
    first_seen = list(dict.fromkeys(int(p) for p in payloads))
    return sum(1 for a, b in itertools.pairwise(first_seen) if b < a)


def run_kill_cycles(
    host: str,
    port: int,
    store: str,
    *,
    cycles: int = 20,
    total: int = 1000,
    client_id: str = "killed-child",
    seed: int = 1,
    first_message_timeout: float = 60.0,
    protocol: int | None = None,
    transport: str = "tcp",
) -> CrashFigures:
    """Kill a publishing child ``cycles`` times (fewer if it finishes first); see the module.

    Each child kills itself with SIGKILL a drawn 0-3 ms after it accepted a randomly drawn
    number of messages (on average the share of the rest that leaves every cycle a kill), from
    a timer thread, so the kill lands wherever the child then is: counted in the child, not
    timed by this process, whose proxy, bridge and observer threads would delay a kill of its
    own (a parent that killed on the count it read let a fast child accept 680 more and finish
    before half the kills). After 10 s without its kill the child is killed from here.
    ``protocol`` (4 or 5) is the MQTT version the child speaks; None: the client's default.
    ``transport="websockets"`` puts a WebSocket bridge
    (:class:`~tests.support.ws_bridge.ThreadedBridge`) between the children and the recording
    proxy, so the children speak MQTT over WebSockets.
    """
    rng = random.Random(seed)
    return _kill_cycles(
        host, port, store, rng, cycles=cycles, total=total, client_id=client_id,
        first_message_timeout=first_message_timeout, protocol=protocol, transport=transport,
    )  # fmt: skip


def _kill_cycles(
    host: str,
    port: int,
    store: str,
    rng: random.Random,
    *,
    cycles: int,
    total: int,
    client_id: str,
    first_message_timeout: float,
    protocol: int | None,
    transport: str,
) -> CrashFigures:
    extra: tuple[str, ...] = ("--protocol", str(protocol)) if protocol is not None else ()
    if transport == "websockets":
        extra += ("--websockets",)
    figures = CrashFigures(store=store.partition(":")[0])
    accepted: set[int] = set()
    boundary: set[int] = set()
    with (
        PahoObserver(host, port, "kill/#", qos=2) as observer,
        # The children publish through an MQTT proxy that records what they wrote: order is
        # checked there, per connection, not at the subscriber (which mosquitto may reorder).
        ThreadedProxy(host, port, mqtt=True) as recorder,
        _front(recorder, transport) as proxy,
    ):
        start = 0
        while figures.kills < cycles and start < total:
            share = max(1, (total - start) // (cycles - figures.kills + 1))
            die = ("--die-after", str(rng.randint(1, 2 * share)), f"{rng.uniform(0, 0.003):.6f}")
            child = subprocess.Popen(
                _child(proxy.host, proxy.port, store, client_id, start, total, *die, *extra),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
            )  # fmt: skip
            assert child.stdout is not None and child.stderr is not None
            if child.stdout.readline().strip() != b"STARTED":
                child.kill()
                raise RuntimeError(f"child did not start: {child.stderr.read().decode()}")
            lines: list[int] = []
            first = threading.Event()
            reader = threading.Thread(
                target=_collect, args=(child.stdout, lines, first), daemon=True
            )
            reader.start()
            if not first.wait(first_message_timeout):
                child.kill()
                raise RuntimeError(f"child accepted nothing in {first_message_timeout}s")
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10.0)  # for its own kill
            child.send_signal(signal.SIGKILL)
            child.wait()
            reader.join()
            child.stderr.close()
            figures.kills += 1
            figures.accepted_per_kill.append(len(lines))
            accepted.update(lines)
            last = max(lines, default=start - 1)
            boundary.add(last + 1)
            start = last + 1
        final = subprocess.run(
            _child(proxy.host, proxy.port, store, client_id, start, total, "--drain", *extra),
            capture_output=True, env=_env(), cwd=ROOT, timeout=180,
        )  # fmt: skip
        if final.returncode != 0 or b"DRAINED" not in final.stdout:
            raise RuntimeError(f"final child failed: {final.stderr.decode()}")
        accepted.update(
            int(line.split()[1]) for line in final.stdout.decode().splitlines()
            if line.startswith("OK ")
        )  # fmt: skip
        observer.wait_numbers(accepted, 30)
        payloads = {t: observer.payloads(t) for t in ("kill/q1", "kill/q2")}
        packets = recorder.packets()
    arrived = {int(p) for p in payloads["kill/q1"] + payloads["kill/q2"]}
    q2 = Counter(int(p) for p in payloads["kill/q2"])
    figures.accepted = len(accepted)
    figures.arrived = len(arrived & accepted)
    figures.lost = sorted(accepted - arrived)
    figures.qos2_duplicates = sorted(i for i, n in q2.items() if n > 1 and i not in boundary)
    figures.boundary_repeats = sum(1 for i, n in q2.items() if n > 1 and i in boundary)
    figures.out_of_order = _out_of_order(payloads["kill/q1"]) + _out_of_order(payloads["kill/q2"])
    figures.wire_out_of_order = wire_order_violations(packets, may_repeat=boundary)
    return figures
