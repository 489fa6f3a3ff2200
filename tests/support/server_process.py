"""One broker process a test owns: spawn, wait until it serves MQTT, stop, kill, restart.

The common part of the RabbitMQ and nats-server fixtures (mosquitto has its own, older
:class:`~tests.support.broker.MosquittoBroker`). A subclass says how to write its files and what
to run; this class starts it with its output in ``workdir``, waits until the MQTT port answers
CONNECT with CONNACK, registers it with the reaper (so nothing outlives the test process) and
stops it with SIGTERM, then SIGKILL if it hangs. The MQTT port is picked once and kept across
restarts, so clients reconnect to the same address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tests.support.broker import HOST, BrokerStartError, _die_with_parent, free_port
from tests.support.raw_mqtt import answers_connect
from tests.support.reaper import REAPER

__all__ = ["ServerProcess", "executable", "port_open", "read_or_empty"]

STOP_TIMEOUT = 15.0
_POLL = 0.1


class ServerProcess:
    """Base class: a broker on its own free 127.0.0.1 MQTT port with its files in ``workdir``."""

    host: str = HOST
    #: Human name for messages ("RabbitMQ", "nats-server").
    name = "broker"
    start_timeout = 30.0

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port: int = port if port is not None else free_port()
        self.output_path = self.workdir / "output.log"
        self.starts = 0
        #: Seconds the last :meth:`start` took until the broker answered CONNECT.
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    # -- what a subclass provides ----------------------------------------------------------
    def command(self) -> list[str]:
        """The command line that runs the broker in the foreground."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The broker's environment (None: inherit ours)."""
        return None

    def prepare(self) -> None:
        """Write config files and start helpers; called before every start."""

    def popen_options(self) -> dict[str, Any]:
        """Further ``subprocess.Popen`` arguments (stdin, by default closed)."""
        return {"stdin": subprocess.DEVNULL}

    def after_exit(self) -> None:
        """Stop helpers once the broker process is gone; called after every stop and kill."""

    def log_text(self) -> str:
        """The broker's own output (subclasses add their log files)."""
        return read_or_empty(self.output_path)

    # -- addressing --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, the form ``proxy_factory`` takes."""
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        """True while the broker process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Spawn the broker and wait until its MQTT port answers CONNECT with CONNACK."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        timeout = timeout if timeout is not None else self.start_timeout
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.starts += 1
        self._output = open(self.output_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._output.write(f"=== start #{self.starts} on port {self.port} ===\n".encode())
        self._output.flush()
        # PR_SET_PDEATHSIG fires when the spawning *thread* exits, so only from the main thread.
        on_main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.environment(),
            preexec_fn=_die_with_parent if on_main else None,
            **self.popen_options(),
        )
        REAPER.add(self)
        deadline = began + timeout
        probe_id = f"fixture-probe-{self.port}"
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise BrokerStartError(
                    f"{self.name} exited with code {code} during start on port {self.port}\n"
                    f"{self.diagnostics()}"
                )
            if answers_connect(self.host, self.port, probe_id):
                self.last_start_seconds = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"{self.name} did not answer CONNECT on port {self.port} within "
                    f"{timeout:.0f}s\n{self.diagnostics()}"
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (a clean shutdown that keeps persistent sessions), SIGKILL if it hangs."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self._signal(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``hard=True``) and start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT)
            self._reap()
        self.after_exit()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        if self._output is not None:
            self._output.close()
            self._output = None
        REAPER.discard(self)

    # -- diagnostics -------------------------------------------------------------------------
    def diagnostics(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- {self.name} log tail ({self.workdir}) ---\n{tail}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(STOP_TIMEOUT)


def read_or_empty(path: Path) -> str:
    """A log file's text, or "" if the broker has not written it yet."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def port_open(host: str, port: int) -> bool:
    """True while something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def executable(path: str | None) -> str | None:
    """``path`` if it names an executable file, else None."""
    return path if path and os.access(path, os.X_OK) else None
