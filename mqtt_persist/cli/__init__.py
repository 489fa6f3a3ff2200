"""``mqtt-persist``, the command-line tool: sessions in any store, durable pub, sub, the demo.

The commands need click (``pip install 'mqtt-persist[cli]'``); ``import mqtt_persist`` never
does. :func:`main` is the console script: it says how to install click when it is missing, and
runs the command otherwise. Modules: ``app`` (the command tree and how errors become exit
codes), ``exits`` (the exit codes), ``redaction`` (no password in any output), ``render``
(tables, JSON, progress bars), ``options`` (options shared by commands), ``access`` (finding a
session and holding its lease), ``sessions`` and ``inspect`` (``sessions
list/show/delete/cleanup``), ``transfer`` and ``session_file`` (``sessions export/import`` and
their JSON Lines format), ``broker`` (connection options), ``pub``, ``sub``, ``demo`` (the phase
1-3 demo, also run by examples/persistent_session.py) and ``running`` (asyncio with Ctrl-C and
SIGTERM).
"""

import sys

# As few imports as possible before main() can catch a Ctrl-C: none but sys (loaded already).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def main(argv: "Sequence[str] | None" = None) -> int:
    """Run ``mqtt-persist`` with ``argv`` (default: the process's arguments); the exit code.

    Ctrl-C at any point, the imports included, ends it with 130 and one line, no traceback.
    """
    # Everything but this module is imported in here (``import mqtt_persist`` imports
    # nothing), so a Ctrl-C during the half second of imports is caught too.
    try:
        try:
            import click  # noqa: F401  (only whether it is there)
        except ImportError:
            print(
                "mqtt-persist: error: the command-line tool needs click; "
                "install it with: pip install 'mqtt-persist[cli]'",
                file=sys.stderr,
            )
            return 1
        from mqtt_persist.cli.app import run

        return run(argv)
    except KeyboardInterrupt:
        sys.stderr.write("mqtt-persist: error: interrupted\n")
        return 130  # ExitCode.INTERRUPTED, whose module may be the one interrupted
    finally:
        if argv is None:
            # The process's own run is over and its status decided: a Ctrl-C while Python
            # exits would only turn that into a traceback or a death by SIGINT. (The commands
            # imported signal already: this import costs nothing.)
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
