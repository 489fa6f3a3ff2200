"""One private mosquitto for the benchmarks: its own temp dir, config and free 127.0.0.1 port.

The system broker on 1883 is never used. The broker is started with ``PR_SET_PDEATHSIG`` on
Linux, so it dies with the benchmark even if the benchmark itself is SIGKILLed, and
:meth:`Mosquitto.stop` (called from ``finally``/``__exit__``) terminates it and removes its
directory in every other case.
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
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

HOST = "127.0.0.1"
_FALLBACK = "/usr/sbin/mosquitto"
_RUNNING = b" running"  # "mosquitto version 2.0.11 running", logged once the listener is open

#: Settings every client in the benchmark meets alike.
CONFIG_TEMPLATE = """\
listener {port} {host}
allow_anonymous true
user root
# mosquitto's own socket would otherwise use Nagle, throttling acknowledgements for every client.
set_tcp_nodelay true
max_queued_messages 1000000
max_inflight_messages 20
persistence false
log_dest stderr
"""

try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc
    _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def find_mosquitto() -> str:
    """``$MOSQUITTO``, then PATH, then /usr/sbin/mosquitto."""
    for candidate in (os.environ.get("MOSQUITTO"), shutil.which("mosquitto"), _FALLBACK):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("mosquitto not found (install it or set $MOSQUITTO)")


def mosquitto_version(binary: str) -> str:
    """The first line of ``mosquitto -h``, e.g. ``mosquitto version 2.0.11``."""
    result = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """``with Mosquitto() as broker:`` → ``broker.port``; stopped and cleaned up on exit."""

    host = HOST

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_mosquitto()
        self.version = mosquitto_version(self.binary)
        self.port = 0
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-broker-"))
        last_error = ""
        for _attempt in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            config = self.workdir / "mosquitto.conf"
            config.write_text(CONFIG_TEMPLATE.format(port=self.port, host=HOST))
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if _RUNNING in self.log_path.read_bytes() and _port_open(self.port):
                    return
                time.sleep(0.02)
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self._terminate()
        self.stop()
        raise RuntimeError(f"mosquitto did not start:\n{last_error}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Terminate the broker (kill after 5 s) and remove its directory. Idempotent."""
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
