"""Ctrl-C at any moment of ``mqtt-persist``, its imports included: exit 130, one line at most.

A Ctrl-C in the first half second, while Python imported the package, printed a
KeyboardInterrupt traceback and killed the process by SIGINT (status -2). Two ways in: SIGINT
sent by the clock at a few delays, and SIGINT raised inside the import of one module at a time
(deterministic: a hook in the import system sends it as that module is looked up).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.broker import free_port
from tests.support.cli import CLI, start_cli

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc to see Python's SIGINT handler"
)


def _catches_sigint(pid: int) -> bool:
    """Whether the process installed a SIGINT handler: Python did, the interpreter is up."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def _assert_quiet_interrupt(code: int, out: str, err: str, what: object) -> None:
    assert code == 130, (what, code, out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, (what, err)
    lines = err.splitlines()
    assert len(lines) <= 1, (what, err)
    assert all(line.startswith("mqtt-persist: error: interrupted") for line in lines), (what, err)


def _interrupted_after(delay: float, store: Path) -> tuple[int, str, str]:
    """Start a run, SIGINT it ``delay`` s after Python installed its handler; what it said."""
    # pub --wait-ack with the broker down waits until interrupted: a late signal lands in
    # the command, an early one in the imports.
    running = start_cli(
        "pub", "--store", store.as_uri(), "-i", "c", "-t", "t", "-m", "x",
        "--port", str(free_port()), "--wait-ack", "--timeout", "60",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _catches_sigint(running.pid):
            assert running.poll() is None and time.monotonic() < deadline, running.poll()
            time.sleep(0.001)
        time.sleep(delay)
        running.send_signal(signal.SIGINT)
        out, err = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    return running.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("delay", [0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7])
def test_ctrl_c_at_any_time_exits_130_without_a_traceback(delay: float, tmp_path: Path) -> None:
    for _ in range(3):
        code, out, err = _interrupted_after(delay, tmp_path / "s")
        # Python's site.py runs the first milliseconds after the handler is there, before any
        # code of the tool: a signal that lands in it (on a loaded machine) says nothing here.
        if '"<frozen site>"' not in err:
            break
    _assert_quiet_interrupt(code, out, err, delay)


_INTERRUPTING = """
import os, runpy, signal, sys

module, command = sys.argv[1], sys.argv[2]


class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt raised here, in the import
        return None


sys.meta_path.insert(0, Interrupt())
sys.argv = sys.argv[2:]
if command.endswith("mqtt-persist"):
    runpy.run_path(command, run_name="__main__")
else:
    runpy.run_module("mqtt_persist.cli", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "module",
    [
        "click",
        "mqtt_persist.cli.app",
        "mqtt_persist.client",
        "mqtt_persist.stores.sqlite",
        "mqtt_persist.cli.sub",
        "anyio",
    ],
)
def test_ctrl_c_during_an_import_exits_130_without_a_traceback(module: str) -> None:
    """Each of these is imported after the console script handed over to ``main``."""
    command = CLI[0] if CLI[0].endswith("mqtt-persist") else "-m"
    completed = subprocess.run(
        [sys.executable, "-c", _INTERRUPTING, module, command, "--version"],
        capture_output=True,
        timeout=60,
    )
    # --version would exit 0: 130 also proves the module was imported, and interrupted.
    _assert_quiet_interrupt(
        completed.returncode, completed.stdout.decode(), completed.stderr.decode(), module
    )


_INTERRUPTING_AT_EXIT = """
import atexit, os, runpy, signal, sys

# Registered first, so run last: as Python exits, after the command and its own clean-up.
atexit.register(os.kill, os.getpid(), signal.SIGINT)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not CLI[0].endswith("mqtt-persist"), reason="needs the console script")
def test_ctrl_c_while_python_exits_after_the_command_changes_nothing() -> None:
    """The command is over: its status stands (it became a traceback, or death by SIGINT)."""
    completed = subprocess.run(
        [sys.executable, "-c", _INTERRUPTING_AT_EXIT, CLI[0], "sessions", "list", "--store",
         "memory://"],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, b"no sessions\n", b"")


def test_importing_the_package_imports_nothing_else() -> None:
    """What keeps the window before ``main`` can catch a Ctrl-C down to a millisecond."""
    code = "import sys, mqtt_persist.cli; print(sorted(m for m in sys.modules if 'mqtt' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out.decode().strip() == "['mqtt_persist', 'mqtt_persist.cli']"
