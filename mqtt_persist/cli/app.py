"""The command tree of ``mqtt-persist``, and the one place where errors become exit codes.

Every failure ends as one line on stderr, ``mqtt-persist: error: ...``, scrubbed of secrets,
with the exit code of :class:`~mqtt_persist.cli.exits.ExitCode`; ``--debug`` adds the
traceback (scrubbed too) and the library's debug log.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import click

from mqtt_persist import __version__
from mqtt_persist.cli.access import held_error
from mqtt_persist.cli.demo import parse_broker, private_mosquitto, run_demo
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.options import store_option
from mqtt_persist.cli.pub import pub_command
from mqtt_persist.cli.redaction import SECRETS, ScrubFilter
from mqtt_persist.cli.running import run_async
from mqtt_persist.cli.sessions import sessions
from mqtt_persist.cli.sub import sub_command
from mqtt_persist.errors import InvalidInput, MqttPersistError, SessionLocked
from mqtt_persist.log import LOGGER_NAME
from mqtt_persist.stores.base import SessionStore
from mqtt_persist.stores.file import FileStore

__all__ = ["cli", "run"]


class _Settings:
    """What the top-level options decided, for the error handler that runs after click."""

    debug = False


SETTINGS = _Settings()


class _StopRecords(logging.Filter):
    """Holds back the library's "client stopped: <error>" records until the command ends.

    The command usually fails with that very error, and then its own error line says it: the
    record would make a second line (docs/cli.md: a failure is one line). A record whose error
    the command did not report is shown after all, before the command's own error line or at
    its end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self._releasing = False
        self.handler: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a "client stopped" record (kept), True for every other."""
        if self._releasing or not (
            record.levelno >= logging.ERROR
            and isinstance(record.msg, str)
            and record.msg.endswith("client stopped: %s")
            and isinstance(record.args, tuple)
            and len(record.args) == 1
            and isinstance(record.args[0], BaseException)
        ):
            return True
        self.held.append(record)
        return False

    def release(self, reported: BaseException | None = None) -> None:
        """Show the held records, except one whose error is ``reported`` (or its cause)."""
        chain: list[BaseException] = []
        error = reported
        while error is not None and error not in chain:
            chain.append(error)
            error = error.__cause__ or error.__context__
        held, self.held = self.held, []
        if self.handler is None:
            return
        self._releasing = True
        try:
            for record in held:
                assert isinstance(record.args, tuple)
                if not any(record.args[0] is e for e in chain):
                    self.handler.handle(record)
        finally:
            self._releasing = False


STOP_RECORDS = _StopRecords()


class _DamagedSkipped(logging.Filter):
    """Counts the stores' "skipping damaged session ..." warnings (every store words it so).

    ``list_sessions`` leaves such a session out and warns; a command that then finds no
    session says why it may be missing, in its own error line, rather than look unrelated
    to the warning above it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True: the record is shown, only counted."""
        if (
            record.levelno == logging.WARNING
            and isinstance(record.msg, str)
            and record.msg.startswith("skipping damaged session")
        ):
            self.count += 1
        return True


DAMAGED_SKIPPED = _DamagedSkipped()


@click.group(context_settings={"max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and the library's debug log.")
@click.option("-v", "--verbose", is_flag=True, help="Show the library's informational log.")
@click.version_option(__version__, prog_name="mqtt-persist")
def cli(debug: bool, verbose: bool) -> None:
    """Sessions of mqtt_persist clients, from the shell: inspect, move, publish, subscribe.

    Stores are named by URL (--store, or the env MQTT_PERSIST_STORE): file:///var/lib/app,
    sqlite:///var/lib/app/sessions.db, redis://host:6379/0?prefix=app, memory://.
    Exit codes: 0 ok, 1 failed, 2 bad usage, 3 session held by a live client, 4 no such
    session, 5 session exists (import), 6 timeout, 130 interrupted.
    """
    SETTINGS.debug = debug
    _configure_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)


def _configure_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Before ScrubFilter, which merges the error into the message.
    STOP_RECORDS.handler = handler
    DAMAGED_SKIPPED.count = 0
    handler.addFilter(STOP_RECORDS)
    handler.addFilter(DAMAGED_SKIPPED)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("mqtt-persist: %(levelname)s: %(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


cli.add_command(sessions)
cli.add_command(pub_command)
cli.add_command(sub_command)


@cli.command("demo")
@click.option("--broker", help="mqtt://HOST:PORT (default: start a private mosquitto).")
@click.option("-i", "--client-id", default="persistent-demo", show_default=True)
@store_option(required=False)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the connection and for the queued messages.",
)
def demo_command(
    broker: str | None, client_id: str, store: SessionStore | None, timeout: float
) -> int:
    """The phase 1-3 reconnect demo (default store: a temporary directory)."""
    try:
        address = parse_broker(broker) if broker else None
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    with tempfile.TemporaryDirectory(prefix="mqtt-persist-demo-") as tmp:
        workdir = Path(tmp)
        chosen = store or FileStore(workdir / "sessions")
        where = "the store" if store else str(workdir / "sessions")

        def demo(host: str, port: int) -> bool:
            def say(line: str) -> None:
                click.echo(line)

            return run_async(
                lambda: run_demo(
                    host, port, client_id, chosen, where=where, timeout=timeout, say=say
                )
            )

        if address is not None:
            ok = demo(*address)
        else:
            with private_mosquitto(workdir) as (host, port):
                click.echo(f"Started a private mosquitto on {host}:{port}")
                ok = demo(host, port)
    return ExitCode.OK if ok else ExitCode.FAILED


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; its exit code. Nothing but a one-line message on failure."""
    try:
        return _run(argv)
    finally:
        STOP_RECORDS.release()


def _run(argv: Sequence[str] | None) -> int:
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="mqtt-persist",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.exceptions.Abort:
        return _fail("aborted", ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        # Usage errors: click's own text (it names the option), on one line like every error.
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        return _fail(message, exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # The reader of stdout left (`... | head`): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FAILED
    except Exception as exc:
        return _fail_with(exc)
    return int(result) if isinstance(result, int) else ExitCode.OK


def _fail_with(exc: Exception) -> int:
    STOP_RECORDS.release(reported=exc)
    if isinstance(exc, SessionLocked):
        exc = held_error(exc)
    if isinstance(exc, CliError):
        code, message = exc.code, str(exc)
    elif isinstance(exc, InvalidInput):
        code, message = ExitCode.USAGE, str(exc)
    elif isinstance(exc, MqttPersistError):
        code, message = ExitCode.FAILED, str(exc)
    else:
        code, message = ExitCode.FAILED, f"{type(exc).__name__}: {exc}"
    if code == ExitCode.NO_SESSION and DAMAGED_SKIPPED.count:
        skipped = DAMAGED_SKIPPED.count
        message += f"; {skipped} damaged session{'s' if skipped > 1 else ''} skipped (the "
        message += f"warning{'s' if skipped > 1 else ''} above)"
    if SETTINGS.debug:
        text = "".join(traceback.format_exception(exc))
        sys.stderr.write(SECRETS.scrub(text))
    return _fail(message, code)


def _fail(message: str, code: int) -> int:
    line = " ".join(SECRETS.scrub(message).split()) or "failed"
    sys.stderr.write(f"mqtt-persist: error: {line}\n")
    return code
