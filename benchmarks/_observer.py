"""The outside subscriber that counts what really reached the broker and came out again.

It is paho-mqtt (not any client under test), MQTT 3.1.1, subscribed at QoS 2 to one topic, and
it runs in a **process of its own** (``_observer_proc.py``, started with ``sys.executable``):
as a thread of the benchmark process it competed for the GIL with the client being measured and
capped every client's end-to-end rate (e.g. 20,000 msg/s acknowledged, 8,500 msg/s counted).
Every benchmark payload starts with its index as 8 ASCII digits, so the counter knows exactly
which messages arrived, how many distinct ones, and how many arrived more than once; it
timestamps the first arrival, the latest, and the one that completes the set.

:class:`ArrivalCounter` is the benchmark's side of it. It starts no thread: the child reports
its progress as lines on a pipe, and every look at an attribute reads what is there without
blocking. All its times are ``time.monotonic()`` of the child, which on Linux is the same
system-wide clock as ``time.monotonic()`` here (see ``_observer_proc.py``; checked on every
start), so the benchmark times its own events with ``time.monotonic()`` too.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from _observer_proc import INDEX_DIGITS

__all__ = ["INDEX_DIGITS", "ArrivalCounter", "make_payloads"]

_CHILD = str(Path(__file__).resolve().with_name("_observer_proc.py"))


def make_payloads(count: int, size: int) -> list[bytes]:
    """``count`` payloads of ``size`` bytes; payload i starts with i as 8 ASCII digits."""
    if size < INDEX_DIGITS:
        raise ValueError(f"payloads need at least {INDEX_DIGITS} bytes to carry their index")
    filler = b"x" * (size - INDEX_DIGITS)
    return [b"%08d" % i + filler for i in range(count)]


def _time(field: bytes) -> float | None:
    return None if field == b"-" else float(field)


class ArrivalCounter:
    """Subscribes to ``topic`` (in a child process) and counts arrivals of payloads
    0..expected-1. ``start()`` returns after the SUBACK; ``stop()`` ends the child and takes its
    final, exact figures; in between the attributes are the child's latest report (at most
    ``_observer_proc.REPORT_SECONDS`` old, and at once for the first and the completing
    arrival)."""

    def __init__(self, host: str, port: int, topic: str, expected: int) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.expected = expected
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._final = False
        self._total = self._unique = self._duplicates = self._foreign = self._disconnects = 0
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._t_complete: float | None = None
        #: Why the figures may be incomplete (the child died, lost its connection, ...); "" if not.
        self.error = ""
        #: After stop(): seconds the child's network thread ran on a CPU, and waited runnable
        #: for one, from its SUBACK until it was told to stop.
        self.cpu_seconds: float | None = None
        self.wait_seconds: float | None = None

    # -- the child's reports ------------------------------------------------------------------

    def _apply(self, line: bytes) -> None:
        fields = line.split()
        if not fields or fields[0] not in (b"p", b"f"):
            return
        total, unique, duplicates, foreign, t_first, t_last, t_complete, disconnects = fields[1:9]
        self._total, self._unique = int(total), int(unique)
        self._duplicates, self._foreign = int(duplicates), int(foreign)
        self._t_first, self._t_last = _time(t_first), _time(t_last)
        self._t_complete, self._disconnects = _time(t_complete), int(disconnects)
        if fields[0] == b"f":
            self._final = True
            self.cpu_seconds, self.wait_seconds = float(fields[9]), float(fields[10])

    def _poll(self) -> None:
        """Take whatever the child wrote since the last look, without waiting."""
        proc = self._proc
        if self._final or proc is None or proc.stdout is None:
            return
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(proc.stdout.fileno(), 65536):
                chunks.append(chunk)
        if not chunks:
            return
        *lines, self._buffer = (self._buffer + b"".join(chunks)).split(b"\n")
        # Progress lines supersede each other: the last complete one is what counts.
        for line in reversed(lines):
            if line.startswith((b"p ", b"f ")):
                self._apply(line)
                break

    @property
    def total(self) -> int:
        self._poll()
        return self._total

    @property
    def unique(self) -> int:
        self._poll()
        return self._unique

    @property
    def duplicates(self) -> int:
        self._poll()
        return self._duplicates

    @property
    def foreign(self) -> int:
        """Payloads that were not ours (wrong index or shape): must stay 0."""
        self._poll()
        return self._foreign

    @property
    def t_first(self) -> float | None:
        """``time.monotonic()`` of the first arrival."""
        self._poll()
        return self._t_first

    @property
    def t_last(self) -> float | None:
        """``time.monotonic()`` of the latest arrival."""
        self._poll()
        return self._t_last

    @property
    def t_complete(self) -> float | None:
        """``time.monotonic()`` of the arrival that completed the set (the N-th distinct)."""
        self._poll()
        return self._t_complete

    @property
    def complete(self) -> bool:
        self._poll()
        return self._t_complete is not None

    @property
    def busy(self) -> float | None:
        """After :meth:`stop`: the time the child's network thread (paho's, which does all the
        per-message work) ran or waited runnable for a CPU, over the span from the first to the
        latest arrival (outside that span it has nothing to do). Near 1.0 it never waited for a
        message: the observer, not the client, set the pace of the arrivals (the child, the
        broker and the benchmark compete for the same cores). None for fewer than 100 arrivals
        or a span under 50 ms."""
        if self.cpu_seconds is None or self._t_first is None or self._t_last is None:
            return None
        span = self._t_last - self._t_first
        if self._total < 100 or span < 0.05:
            return None
        return (self.cpu_seconds + (self.wait_seconds or 0.0)) / span

    def snapshot(self) -> tuple[int, int, int, float | None, float | None]:
        """(unique, total, duplicates, t_complete, t_last), from one report of the child."""
        self._poll()
        return self._unique, self._total, self._duplicates, self._t_complete, self._t_last

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the child and wait until it reports the SUBACK (blocking)."""
        before = time.monotonic()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                _CHILD,
                self.host,
                str(self.port),
                self.topic,
                str(self.expected),
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,  # its EOF tells the child to stop, also if we die
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        deadline = before + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read_raw(left):
                break
        line = self._buffer.split(b"\n", 1)[0]
        after = time.monotonic()
        if not line.startswith(b"ready "):
            self.stop()
            reason = line.decode(errors="replace").removeprefix("error ") or "no answer"
            raise ConnectionError(f"observer could not subscribe to {self.topic!r}: {reason}")
        self._buffer = self._buffer.split(b"\n", 1)[1]
        ready = float(line.split()[1])
        if not before <= ready <= after:  # the premise of comparing times across processes
            self.stop()
            raise RuntimeError(
                f"time.monotonic() differs between processes: child {ready}, parent between "
                f"{before} and {after}"
            )

    def _read_raw(self, timeout: float) -> bool:
        """Append what arrives within ``timeout`` to the buffer, unparsed; False at EOF."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return True
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        self._buffer += chunk
        return bool(chunk)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the child's stdin, read its final figures, reap it. Idempotent; never raises
        for the child's sake (see :attr:`error`)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = [self._buffer]
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data.append(chunk)
        proc.stdout.close()
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._buffer = b""
        lines = b"".join(data).split(b"\n")
        for line in lines:
            if line.startswith(b"error "):
                self.error = line[6:].decode(errors="replace")
        final = [line for line in lines if line.startswith(b"f ")]
        progress = [line for line in lines if line.startswith(b"p ")]
        if final:
            self._apply(final[-1])
        else:
            if progress:
                self._apply(progress[-1])
            self.error = self.error or (
                f"observer ended without its final report (exit status {proc.returncode})"
            )
        self._final = True
        if self._disconnects and not self.error:
            self.error = f"observer lost its connection {self._disconnects} time(s)"
