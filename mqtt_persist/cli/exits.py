"""The exit codes of ``mqtt-persist`` (documented in docs/cli.md), and the error that carries one.

Scripts branch on them, so each failure a caller can act on has its own code, and a command
fails with exactly one line on stderr (``--debug`` adds the traceback).
"""

from __future__ import annotations

import enum

__all__ = ["CliError", "ExitCode"]


class ExitCode(enum.IntEnum):
    """What the process's exit status means."""

    #: Done: for ``pub``, every message is in the store (and acknowledged, with --wait-ack).
    OK = 0
    #: Failed: the store, the broker or the data (the message says which).
    FAILED = 1
    #: Bad usage: an unknown option, a bad store URL or option value, a malformed file.
    USAGE = 2
    #: The session is held by a live client (the store's lease): nothing was changed.
    SESSION_HELD = 3
    #: No such session (or it expired) in the store.
    NO_SESSION = 4
    #: ``sessions import``: the session exists already and --replace was not given.
    SESSION_EXISTS = 5
    #: A time limit passed: ``pub --wait-ack --timeout``, ``sub --timeout``.
    TIMEOUT = 6
    #: Interrupted (Ctrl-C, SIGTERM), except for ``sub``, where that is the normal end.
    INTERRUPTED = 130


class CliError(Exception):
    """A failure with its own exit code and a one-line message for people."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code
