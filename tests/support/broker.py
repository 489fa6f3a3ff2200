"""Real mosquitto brokers for tests, each on its own free 127.0.0.1 port.

Every broker gets its own generated config file, data directory and log file inside
``workdir``. The system mosquitto on port 1883 is never touched.

Config generation
-----------------
Without ``config_file`` the config is built from scratch::

    listener PORT 127.0.0.1
    allow_anonymous true
    user root                     # we run as root; without it mosquitto drops to `mosquitto`
    set_tcp_nodelay true
    log_dest stderr               # stderr is unbuffered, so log_text() is always current
    log_type error|warning|notice|information   # the defaults, spelled out (see start())
    persistence true|false
    persistence_location WORKDIR/data/
    autosave_interval 1           # only when persistence=True
    <extra_config>

With ``config_file`` (a user's mosquitto.conf, e.g. ``docker/mosquitto/mosquitto.conf``) the
file's lines are *copied* into the generated config (``include_dir`` is not used: it cannot
override a ``listener`` the user file declares, and that listener would collide with port 1883)
with these rewrites, each replaced line kept as a ``# [replaced]``/``# [dropped]`` comment:

* the first ``listener`` line becomes ``listener PORT 127.0.0.1`` *in place*, so the
  listener-scoped options that follow it stay attached to our listener; if the file has no
  listener, ours is put first; a second ``listener`` raises ``ValueError`` (unsupported);
* ``port`` and ``bind_address`` (old-style default listener) are dropped;
* ``persistence_location`` is replaced by ``WORKDIR/data/``;
* ``log_dest``, ``user``, ``pid_file``, ``set_tcp_nodelay`` and ``include_dir`` are dropped and
  our own values are appended (``log_dest stderr``, ``user root``, ``set_tcp_nodelay true``,
  and the default ``log_type`` set, which adds to whatever the file selects);
* ``persistence`` and ``autosave_interval`` are kept from the file; ``persistence=True`` forces
  ``persistence true`` (and ``autosave_interval 1`` if the file has none);
* everything else (``allow_anonymous``, ``max_queued_messages``, ...) is kept verbatim,
  and ``extra_config`` is appended last.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

from tests.support.reaper import REAPER

__all__ = [
    "BrokerFactory",
    "BrokerStartError",
    "MosquittoBroker",
    "find_mosquitto",
    "free_port",
]

_FALLBACK_MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_RUNNING = b" running\n"  # "mosquitto version 2.0.11 running", logged after the listeners open


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: ``$MOSQUITTO`` if set, then PATH, then /usr/sbin."""
    env = os.environ.get("MOSQUITTO")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(_FALLBACK_MOSQUITTO, os.X_OK):
        return _FALLBACK_MOSQUITTO
    return None


def free_port(host: str = HOST) -> int:
    """A port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class BrokerFactory(Protocol):
    """Type of the ``broker_factory`` fixture: MosquittoBroker kwargs, plus ``workdir``."""

    def __call__(self, *, start: bool = True, **kwargs: Any) -> MosquittoBroker: ...


class BrokerStartError(RuntimeError):
    """mosquitto did not come up (bad config, port taken, crashed, or timed out)."""


# --- safety net: no broker outlives the test process ------------------------------------


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc: the atexit hook alone must do
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the broker if the thread that spawned it dies (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --- config generation ---------------------------------------------------------------------

_DROPPED = frozenset(
    {"port", "bind_address", "log_dest", "user", "pid_file", "set_tcp_nodelay", "include_dir"}
)


def _rewrite_user_config(
    text: str, *, source: Path, listener: str, data_dir: str, persistence: bool
) -> list[str]:
    out = [f"# --- copied from {source} with our listener/data dir/logging forced ---"]
    listener_done = False
    has_autosave = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            out.append(raw)
            continue
        key = line.split(None, 1)[0]
        if key == "listener":
            if listener_done:
                raise ValueError(
                    f"{source}: more than one listener is not supported by MosquittoBroker"
                )
            listener_done = True
            out += [f"# [replaced] {raw}", listener]
        elif key in _DROPPED:
            out.append(f"# [dropped] {raw}")
        elif key == "persistence_location":
            out += [f"# [replaced] {raw}", f"persistence_location {data_dir}"]
        elif key == "persistence" and persistence:
            out += [f"# [replaced] {raw}", "persistence true"]
        else:
            has_autosave = has_autosave or key == "autosave_interval"
            out.append(raw)
    if not listener_done:
        out.insert(0, listener)
    out.append("# --- forced by MosquittoBroker ---")
    if not any(ln.split(None, 1)[:1] == ["persistence_location"] for ln in out):
        out.append(f"persistence_location {data_dir}")
    if persistence:
        if not any(ln.strip() == "persistence true" for ln in out):
            out.append("persistence true")
        if not has_autosave:
            out.append("autosave_interval 1")
    return out


class MosquittoBroker:
    """One mosquitto process with its own port, config, data dir and log in ``workdir``.

    The port is picked once (``port=None``) and kept across :meth:`restart`, so clients
    reconnect to the same address. Use as a context manager or call :meth:`stop`.
    """

    host: str = HOST

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        port: int | None = None,
        extra_config: str = "",
        config_file: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.port: int = port if port is not None else free_port()
        self.extra_config = extra_config
        self.config_file = Path(config_file) if config_file is not None else None
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.binary: str | None = None
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addressing ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    # -- config ----------------------------------------------------------------------------
    def config_text(self) -> str:
        listener = f"listener {self.port} {self.host}"
        data_dir = f"{self.data_dir}/"  # mosquitto wants the trailing slash
        if self.config_file is not None:
            lines = _rewrite_user_config(
                self.config_file.read_text(),
                source=self.config_file,
                listener=listener,
                data_dir=data_dir,
                persistence=self.persistence,
            )
        else:
            lines = [
                listener,
                "allow_anonymous true",
                f"persistence {'true' if self.persistence else 'false'}",
                f"persistence_location {data_dir}",
            ]
            if self.persistence:
                lines.append("autosave_interval 1")
        lines += ["user root", "set_tcp_nodelay true", "log_dest stderr"]
        # mosquitto drops messages queued for a slow subscriber beyond max_queued_messages
        # (default 1000) without a word. A test's outside observer must not be where messages
        # go missing, or it would blame the client under test; extra_config can still lower it.
        lines.append("max_queued_messages 100000")
        # mosquitto's default log types, spelled out: log_type lines add up, so this keeps the
        # "... running" notice that start() waits for even if a user config narrowed them.
        lines += [f"log_type {t}" for t in ("error", "warning", "notice", "information")]
        if self.extra_config:
            lines += ["# --- extra_config ---", self.extra_config.strip()]
        return "\n".join(lines) + "\n"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn mosquitto and wait until the port accepts TCP connections."""
        if self.running:
            raise RuntimeError(f"broker on port {self.port} is already running")
        binary = self.binary or find_mosquitto()
        if binary is None:
            raise BrokerStartError("mosquitto binary not found")
        self.binary = binary
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self.starts += 1
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log.write(f"=== start #{self.starts} on port {self.port} ===\n".encode())
        self._log.flush()
        log_offset = self._log.tell()
        # PR_SET_PDEATHSIG fires when the spawning *thread* exits, so only use it from the
        # main thread (a broker started via asyncio.to_thread would die with the worker).
        on_main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent if on_main else None,
        )
        REAPER.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise BrokerStartError(
                    f"mosquitto exited with code {code} during start on port {self.port}\n"
                    f"{self._diagnostics()}"
                )
            # Both: mosquitto says its listeners are open (so the port is not held by someone
            # else), and the port really accepts connections.
            if self._log_since(log_offset, _RUNNING) and _port_open(self.host, self.port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"mosquitto did not accept connections on port {self.port} within "
                    f"{timeout:.0f}s\n{self._diagnostics()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait: a persistent broker writes its session database on the way out."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL and wait: a crash; nothing is saved beyond the last autosave."""
        self._signal(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``hard=True``) then start on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._reap()

    def _reap(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        REAPER.discard(self)

    # -- diagnostics -------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_since(self, offset: int, needle: bytes) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return needle in log.read()
        except FileNotFoundError:
            return False

    def _diagnostics(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- log tail ({self.log_path}) ---\n{tail}\n--- config ---\n{self.config_text()}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.url} {state} persistence={self.persistence}>"

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


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
