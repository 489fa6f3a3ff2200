"""Private redis-server processes for tests, each on its own free 127.0.0.1 port.

Nothing here ever talks to a redis already running on the machine (6379): every server is
started by us with ``--port N --bind 127.0.0.1 --save "" --appendonly no --dir <tmpdir>`` and
stopped by us. :func:`shared_redis_url` starts ONE server per test session, lazily, for the
store conformance suite (tests keep apart by key prefix); :class:`RedisServer` starts one a test
owns. An atexit hook kills any survivor, and on Linux a server also dies with the thread that
started it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import pytest

from tests.support.broker import _die_with_parent, free_port
from tests.support.reaper import REAPER

if TYPE_CHECKING:
    from mqtt_persist.stores.redis import RedisStore

__all__ = [
    "RedisServer",
    "RedisStartError",
    "find_redis_server",
    "make",
    "redis_server_path",
    "shared_redis_url",
    "unique_prefix",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_FALLBACK = "/usr/bin/redis-server"


class RedisStartError(RuntimeError):
    """redis-server did not answer PING in time (or exited)."""


def find_redis_server() -> str | None:
    """Path of redis-server: ``$REDIS_SERVER`` if set, then PATH, then /usr/bin."""
    env = os.environ.get("REDIS_SERVER")
    if env and os.access(env, os.X_OK):
        return env
    return shutil.which("redis-server") or (_FALLBACK if os.access(_FALLBACK, os.X_OK) else None)


def redis_server_path() -> str:
    """The binary, or end the test: ``pytest.fail`` under CI (env CI set), else ``pytest.skip``."""
    path = find_redis_server()
    if path is None:
        message = "redis-server not found (apt-get install redis-server, or set $REDIS_SERVER)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when a redis on ``port`` answers PING (raw RESP: no client library needed)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server with its own port and working directory.

    Without persistence by default; ``appendonly=True`` keeps every write in an append-only
    file fsynced on every write (``appendfsync always``), so a stop, a kill or a restart loses
    nothing it acknowledged. Use as a context manager or call :meth:`start` and :meth:`stop`;
    :meth:`restart` comes back on the same port.
    """

    host: str = HOST

    def __init__(
        self, workdir: Path, *, binary: str | None = None, appendonly: bool = False
    ) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.appendonly = appendonly
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> Self:
        """Start on a free port and wait until PING answers; retries if the port was taken."""
        binary = self.binary or redis_server_path()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = free_port(HOST)
            # The port is only known free a moment ago: another process may grab it first.
            if self._try_start(binary):
                return self
        raise RedisStartError(f"redis-server did not start; see {self.log_path}")

    def _try_start(self, binary: str) -> bool:
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # The same safety net as the brokers': no server outlives a crashed test run.
            preexec_fn=_die_with_parent,
        )
        self.process = process
        REAPER.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if _ping(self.port):
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, *, hard: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``hard=True``) and start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start_again()

    def start_again(self) -> None:
        """Start a stopped server on the port it had, with the same files."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis-server is still running")
        if not self._try_start(self.binary or redis_server_path()):
            raise RedisStartError(
                f"redis-server did not restart on {self.port}; see {self.log_path}"
            )

    def kill(self) -> None:
        """SIGKILL and reap."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_shared: RedisServer | None = None
_shared_lock = threading.Lock()


def _stop_shared() -> None:
    server = _shared
    if server is not None:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)
        shutil.rmtree(server.workdir, ignore_errors=True)


def shared_redis_url() -> str:
    """URL of the one redis-server this test session shares, started on first use.

    Stopped at interpreter exit. Skips (or fails under CI) when redis-server is missing.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared.process is None or _shared.process.poll() is not None:
            binary = redis_server_path()
            workdir = Path(tempfile.mkdtemp(prefix="mqtt-persist-redis-"))
            _shared = RedisServer(workdir, binary=binary).start()
            atexit.register(_stop_shared)
        return _shared.url


def unique_prefix(path: Path) -> str:
    """A key prefix for one test: readable (the directory's name) and unique (its full path)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"t-{path.name}-{digest}"


def make(path: Path, clock: Callable[[], float]) -> RedisStore:
    """A RedisStore on the shared server under a prefix of its own: the conformance kind.

    The same ``path`` gives the same prefix, so a "reopened" store sees the same sessions.
    """
    pytest.importorskip("redis", reason="redis-py not installed (pip install mqtt-persist[redis])")
    from mqtt_persist.stores.redis import RedisStore

    return RedisStore(shared_redis_url(), prefix=unique_prefix(path), clock=clock)
