"""The outside subscriber that counts what really reached the broker and came out again.

It is a C program, none of the clients under test, subscribed at QoS 0 to one topic and writing
``<CLOCK_REALTIME with ns> <payload>`` per message into a file: by default our own
``observer.c`` (built by :func:`build_observer`), or mosquitto's ``mosquitto_sub -F '%U %p'``
(package mosquitto-clients), which writes the same format. The benchmark reads that file: every
payload starts with its index as 8 ASCII digits, so it knows exactly which messages arrived, how
many distinct ones and how many more than once, and when the first, the latest and the
set-completing one arrived.

Why C (the observer before was paho-mqtt in a Python process of its own): paho spent ~65 µs of
CPU per message and ran 91-101 % busy at 15-30k msg/s, so every fast row measured the observer.
``mosquitto_sub`` needs 9-12 µs per message and was 100 % busy at ~70k msg/s; ``observer.c``
~1 µs (big reads, one buffered write per read; see its header), which leaves the broker as the
limit. ``publish_throughput.py`` proves the ceiling in every run with its ``observer ceiling``
rows.

Why QoS 0 and still exact: mosquitto 2.0 drops a QoS 0 message for a connected subscriber only
when that client already has ``max_queued_messages`` packets waiting to be written
(``db__ready_for_flight()`` in src/database.c), and the benchmark broker sets 1,000,000, more
than any run sends; so every message the broker accepted reaches the file, and a message the
broker got twice (a client that sent it twice) is written twice. Subscribing at QoS 1 or 2 would
add a PUBACK (or three packets) per message for the broker and the observer, lowering the
ceiling (measured with mosquitto_sub: ~38k against ~48k msg/s for QoS 1 publishing), and add
nothing: neither resends on a connection that stays up.

Times: both observers stamp ``CLOCK_REALTIME``; :class:`ArrivalCounter` turns the stamps into
``time.monotonic()`` with the offset between the two clocks sampled when it starts, and checks
when it stops that the offset did not move (a stepped wall clock would make a run's times
meaningless; it is then reported as the run's error instead of silently measuring wrong).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _wire import encode_connect, encode_disconnect, encode_publish

__all__ = [
    "INDEX_DIGITS",
    "ArrivalCounter",
    "build_observer",
    "find_mosquitto_sub",
    "make_payloads",
]

INDEX_DIGITS = 8
#: Payload of the probe messages that tell when the subscription is live (not counted).
_PROBE = b"observer-probe"
#: How far the wall clock may drift from the monotonic one during a run before it is an error.
_CLOCK_TOLERANCE = 0.005

try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc
    _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def find_mosquitto_sub() -> str:
    """``$MOSQUITTO_SUB``, then PATH, then /usr/bin/mosquitto_sub."""
    for candidate in (
        os.environ.get("MOSQUITTO_SUB"),
        shutil.which("mosquitto_sub"),
        "/usr/bin/mosquitto_sub",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "mosquitto_sub not found (apt-get install mosquitto-clients, or set $MOSQUITTO_SUB)"
    )


def build_observer(out_dir: Path) -> tuple[Path | None, str]:
    """Compile ``observer.c`` with the C compiler into ``out_dir``: (binary, "") or
    (None, why not)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) found"
    binary = out_dir / "observer"
    source = Path(__file__).resolve().with_name("observer.c")
    result = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None, "cannot build observer.c: " + (result.stderr.strip() or "?").splitlines()[0]
    return binary, ""


def make_payloads(count: int, size: int) -> list[bytes]:
    """``count`` payloads of ``size`` bytes; payload i starts with i as 8 ASCII digits."""
    if size < INDEX_DIGITS:
        raise ValueError(f"payloads need at least {INDEX_DIGITS} bytes to carry their index")
    filler = b"x" * (size - INDEX_DIGITS)
    return [b"%08d" % i + filler for i in range(count)]


def _clock_offset() -> float:
    """``time.time() - time.monotonic()``, from the tightest of a few paired readings."""
    best_gap, best = float("inf"), 0.0
    for _ in range(5):
        m0 = time.monotonic()
        wall = time.time()
        m1 = time.monotonic()
        if m1 - m0 < best_gap:
            best_gap, best = m1 - m0, wall - (m0 + m1) / 2
    return best


def _sched_seconds(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable and waiting for one) of ``pid``'s main thread, which
    is all of either observer (single-threaded); None off Linux."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _slices = f.read().split()
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _probe(host: str, port: int, topic: str) -> None:
    """One QoS 0 probe message through the broker, from a throw-away raw connection."""
    with socket.create_connection((host, port), timeout=2.0) as sock:
        sock.sendall(encode_connect(f"bench-probe-{uuid.uuid4().hex[:10]}"))
        if sock.recv(4)[:2] != b"\x20\x02":
            raise ConnectionError("the broker did not answer the probe's CONNECT")
        sock.sendall(encode_publish(topic, _PROBE, 0, 0) + encode_disconnect())


class ArrivalCounter:
    """Subscribes to ``topic`` with ``binary`` (``observer.c`` built by :func:`build_observer`;
    None: ``mosquitto_sub``) and counts arrivals of payloads 0..expected-1 (of ``payload_size``
    bytes, from :func:`make_payloads`).

    ``start()`` returns once a probe message went through the subscription; ``stop()`` ends the
    subscriber and reads the rest of its file, after which the figures are final and exact.
    In between, every look at an attribute first reads whatever the subscriber wrote since the
    last look (no thread; a few µs per arrived line, paid by whoever looks).
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        expected: int,
        payload_size: int = 64,
        binary: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.expected = expected
        self.payload_size = payload_size
        self._filler = b"x" * (payload_size - INDEX_DIGITS)
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._file: Any = None
        self._buffer = b""
        self._seen = bytearray(expected)
        self._offset = 0.0
        self._sched0: tuple[float, float] | None = None
        self._sched: tuple[float, float] | None = None
        self._total = self._unique = self._duplicates = self._foreign = self._probes = 0
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._t_complete: float | None = None
        #: Why the figures may be incomplete (the subscriber died, the clock moved, ...).
        self.error = ""

    # -- reading the subscriber's file ---------------------------------------------------------

    def poll(self) -> None:
        """Count the lines the subscriber wrote since the last look."""
        if self._file is None:
            return
        data = self._file.read()
        if not data:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        self._count(lines)

    def _count(self, lines: list[bytes]) -> None:
        seen, expected, size, filler = self._seen, self.expected, self.payload_size, self._filler
        completed_at = -1
        first_line: bytes | None = None
        for position, line in enumerate(lines):
            payload = line.partition(b" ")[2]
            if payload == _PROBE:
                self._probes += 1
                continue
            if first_line is None:
                first_line = line
            self._total += 1
            try:
                index = int(payload[:INDEX_DIGITS])
            except ValueError:
                index = -1
            if not 0 <= index < expected or len(payload) != size or not payload.endswith(filler):
                self._foreign += 1
            elif seen[index]:
                self._duplicates += 1
            else:
                seen[index] = 1
                self._unique += 1
                if self._unique == expected:
                    completed_at = position
        if first_line is None:
            return
        # Only three timestamps matter; converting just those keeps a look cheap.
        if self._t_first is None:
            self._t_first = self._stamp(first_line)
        for line in reversed(lines):
            if line.partition(b" ")[2] != _PROBE:
                self._t_last = self._stamp(line)
                break
        if completed_at >= 0:
            self._t_complete = self._stamp(lines[completed_at])

    def _stamp(self, line: bytes) -> float | None:
        try:
            return float(line.partition(b" ")[0]) - self._offset
        except ValueError:
            return None

    # Every figure first reads what the observer wrote since the last look.

    @property
    def total(self) -> int:
        """Arrivals, duplicates and foreign ones included (probes not)."""
        self.poll()
        return self._total

    @property
    def unique(self) -> int:
        """Distinct messages 0..expected-1 that arrived."""
        self.poll()
        return self._unique

    @property
    def duplicates(self) -> int:
        """Arrivals of a message that had arrived before."""
        self.poll()
        return self._duplicates

    @property
    def foreign(self) -> int:
        """Arrivals that are not one of the expected payloads: must stay 0."""
        self.poll()
        return self._foreign

    @property
    def probes(self) -> int:
        """Probe messages seen (sent by :meth:`start`; not arrivals)."""
        self.poll()
        return self._probes

    @property
    def t_first(self) -> float | None:
        """``time.monotonic()`` of the first arrival."""
        self.poll()
        return self._t_first

    @property
    def t_last(self) -> float | None:
        """``time.monotonic()`` of the latest arrival."""
        self.poll()
        return self._t_last

    @property
    def t_complete(self) -> float | None:
        """``time.monotonic()`` of the arrival that completed the set (the N-th distinct)."""
        self.poll()
        return self._t_complete

    @property
    def complete(self) -> bool:
        """All N distinct messages arrived."""
        return self.t_complete is not None

    @property
    def busy(self) -> float | None:
        """After :meth:`stop`: the time the subscriber ran or waited runnable for a CPU, over
        the span from the first to the latest arrival. Near 1.0 it never waited for a message:
        it set the pace. None under 100 arrivals, a span under 20 ms, or off Linux."""
        if self._sched is None or self._sched0 is None:
            return None
        if self._t_first is None or self._t_last is None or self._total < 100:
            return None
        span = self._t_last - self._t_first
        if span < 0.02:
            return None
        used = sum(self._sched) - sum(self._sched0)
        return used / span

    def snapshot(self) -> tuple[int, int, int, float | None, float | None]:
        """(unique, total, duplicates, t_complete, t_last)."""
        self.poll()
        return self._unique, self._total, self._duplicates, self._t_complete, self._t_last

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the subscriber and return once a probe message reached its file."""
        self._dir = Path(tempfile.mkdtemp(prefix="mqtt-bench-observer-"))
        path = self._dir / "arrivals"
        client_id = f"bench-observer-{uuid.uuid4().hex[:10]}"
        if self._binary is not None:
            command = [str(self._binary), self.host, str(self.port), self.topic, client_id]
        else:
            command = [
                find_mosquitto_sub(),
                *("-h", self.host, "-p", str(self.port), "-t", self.topic),
                *("-q", "0", "-i", client_id, "-F", "%U %p"),
            ]
        with open(path, "wb") as out:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        self._file = open(path, "rb")  # noqa: SIM115 - closed in stop()
        self._offset = _clock_offset()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                stderr = self._proc.stderr
                reason = stderr.read().decode(errors="replace") if stderr else ""
                self.stop()
                raise ConnectionError(f"observer exited: {reason.strip() or 'no reason'}")
            with contextlib.suppress(OSError):
                _probe(self.host, self.port, self.topic)
            pause = time.monotonic() + 0.05
            while time.monotonic() < pause:
                if self.probes:
                    self._sched0 = _sched_seconds(self._proc.pid)
                    return
                time.sleep(0.005)
            if time.monotonic() > deadline:
                self.stop()
                raise ConnectionError(f"observer: no probe came through {self.topic!r} in time")

    def stop(self, timeout: float = 10.0) -> None:
        """End the subscriber (SIGTERM: it disconnects and exits), take its last lines.
        Idempotent; never raises for the subscriber's sake (see :attr:`error`)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._sched = _sched_seconds(proc.pid)
            if proc.poll() is not None and not self.error:
                why = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                self.error = f"the observer ended early (exit status {proc.returncode}) {why}"
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        self.poll()
        if self._buffer:  # a last line without its newline: the subscriber was cut off
            self._count([self._buffer])
            self._buffer = b""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if abs(_clock_offset() - self._offset) > _CLOCK_TOLERANCE and not self.error:
            self.error = "the wall clock moved against the monotonic clock during the run"
