"""The outside subscriber's own process: ``_observer.ArrivalCounter`` runs this file.

    python _observer_proc.py HOST PORT TOPIC EXPECTED PARENT_PID

It is paho-mqtt (none of the clients under test), MQTT 3.1.1, ``CallbackAPIVersion.VERSION2``,
subscribed at QoS 2 to TOPIC with paho's network loop in a thread. It runs in a process of its
own so that it does not compete for the benchmark process's GIL with the client being measured
(in a thread of that process it capped every client's end-to-end rate, the fastest ones most).

Protocol, ASCII lines on stdout:

- ``ready <t>`` once the SUBACK granted QoS 2 (``<t>`` = this process's ``time.monotonic()``),
  or ``error <text>`` and exit status 1 when connecting or subscribing failed;
- ``p <total> <unique> <duplicates> <foreign> <t_first> <t_last> <t_complete> <disconnects>``,
  the progress, every ``REPORT_SECONDS`` while it changes and at once on the first arrival and
  on the arrival that completes the set; times are ``time.monotonic()`` (``-``: none yet);
- ``f ... <cpu> <wait>`` the same fields once more, final, after stdin reached EOF (the parent
  closed it or died) and the connection is closed, plus the seconds paho's network thread (which
  does all the per-message work) ran on a CPU, and waited runnable for one, from ``ready`` until
  that EOF; then exit status 0.

The timestamps are ``time.monotonic()``, i.e. ``CLOCK_MONOTONIC``, which on Linux is one clock
for the whole system (time since boot), so the parent can subtract its own ``time.monotonic()``
from them. Checked here: a parent's monotonic() before spawning a child <= the child's value <=
the parent's value after the child printed it, 200 times out of 200; and ``ArrivalCounter``
checks it again on every ``ready`` line.

The progress fields are read by the reporting loop without a lock while paho's thread updates
them, so one ``p`` line may be a message out of step between its fields; the ``f`` line is
written after paho's thread has stopped and is exact. The per-message work is kept to the index
prefix, two counters, one ``bytearray`` lookup and one timestamp.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

INDEX_DIGITS = 8
#: How often the progress is reported while it changes.
REPORT_SECONDS = 0.01
SUBSCRIBE_TIMEOUT = 10.0


def sched_seconds(tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of thread ``tid`` of this
    process (``/proc/self/task/<tid>/schedstat``, Linux); elsewhere (``process_time()``, 0)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            on_cpu, waiting, _slices = f.read().split()
    except (OSError, ValueError):
        return time.process_time(), 0.0
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the parent dies (Linux); the stdin EOF below covers every other case."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


class Counter:
    __slots__ = (
        "disconnects",
        "duplicates",
        "error",
        "expected",
        "foreign",
        "loop_thread",
        "seen",
        "subscribed",
        "t_complete",
        "t_first",
        "t_last",
        "total",
        "unique",
        "wake",
    )

    def __init__(self, expected: int, wake: int) -> None:
        self.expected = expected
        self.seen = bytearray(expected)
        self.total = self.unique = self.duplicates = self.foreign = self.disconnects = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.t_complete: float | None = None
        self.wake = wake  # write end of a pipe the reporting loop also waits on
        self.subscribed = threading.Event()
        self.error = ""
        self.loop_thread = 0  # native id of paho's network thread, which does all the work

    def line(self, kind: str, *extra: float) -> bytes:
        def t(value: float | None) -> str:
            return "-" if value is None else repr(value)

        fields = [self.total, self.unique, self.duplicates, self.foreign]
        times = [t(self.t_first), t(self.t_last), t(self.t_complete)]
        return (
            " ".join(map(str, [kind, *fields, *times, self.disconnects, *extra])) + "\n"
        ).encode()


def make_client(counter: Counter, topic: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-observer-{uuid.uuid4().hex[:10]}",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    seen, expected, monotonic = counter.seen, counter.expected, time.monotonic

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        counter.loop_thread = threading.get_native_id()
        if rc.is_failure:
            counter.error = f"CONNACK refused: {rc}"
            counter.subscribed.set()
            return
        result, _mid = client.subscribe(topic, qos=2)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            counter.error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
            counter.subscribed.set()

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if any(code.is_failure or code.value != 2 for code in codes):  # granted QoS, 3.1.1
            counter.error = f"SUBACK did not grant QoS 2: {[code.value for code in codes]}"
        counter.subscribed.set()

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        # Only a lost connection counts; a reconnect would be a clean session again (messages
        # published meanwhile are not queued for it), so the parent reports it as an error.
        if rc.is_failure:
            counter.disconnects += 1

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = monotonic()
        counter.t_last = now
        counter.total += 1
        if counter.t_first is None:
            counter.t_first = now
            os.write(counter.wake, b".")
        try:
            index = int(message.payload[:INDEX_DIGITS])
        except ValueError:
            index = -1
        if not 0 <= index < expected:
            counter.foreign += 1
        elif seen[index]:
            counter.duplicates += 1
        else:
            seen[index] = 1
            counter.unique += 1
            if counter.unique == expected:
                counter.t_complete = now
                os.write(counter.wake, b".")

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    return client


def write(data: bytes) -> None:
    """All of ``data`` to stdout (blocking: the parent reads whenever it looks)."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def main(argv: list[str]) -> int:
    host, port, topic, expected, parent_pid = argv
    _die_with_parent(int(parent_pid))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    counter = Counter(int(expected), wake_w)
    client = make_client(counter, topic)
    try:
        client.connect(host, int(port), keepalive=60)
    except OSError as exc:
        write(f"error connect: {exc}\n".encode())
        return 1
    client.loop_start()
    cpu0 = wait0 = 0.0
    try:
        if not counter.subscribed.wait(SUBSCRIBE_TIMEOUT) or counter.error:
            write(f"error {counter.error or 'no SUBACK within 10 s'}\n".encode())
            return 1
        cpu0, wait0 = sched_seconds(counter.loop_thread)
        write(f"ready {time.monotonic()!r}\n".encode())
        stdin = sys.stdin.fileno()
        last = b""
        while True:
            readable, _, _ = select.select([stdin, wake_r], [], [], REPORT_SECONDS)
            if wake_r in readable:
                os.read(wake_r, 64)
            if stdin in readable and not os.read(stdin, 4096):
                cpu, wait = sched_seconds(counter.loop_thread)  # before it ends
                break  # EOF: the parent is done (or gone)
            line = counter.line("p")
            if line != last:
                write(line)
                last = line
    finally:
        client.disconnect()
        client.loop_stop()
    write(counter.line("f", cpu - cpu0, wait - wait0))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # the parent went away while we reported
        os._exit(1)
