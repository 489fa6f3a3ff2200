"""``mqtt-persist sub``: print the messages of a persistent session.

The session (its subscriptions, and the broker's queue for it) outlives the command: what is
published while no ``sub`` runs arrives with the next one that uses the same client id and
store. Ctrl-C or SIGTERM is the normal end (exit 0).

A message is acknowledged to the broker only once it was printed (``ack="manual"``), so
nothing is lost when the command ends, whatever ends it: messages that arrived past
``--count``, or were not printed yet when it was interrupted, come again with the next run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import click

from mqtt_persist.cli.broker import BrokerOptions
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.options import broker_options, client_id_option, store_option
from mqtt_persist.cli.redaction import SECRETS
from mqtt_persist.cli.running import Interrupted, run_async
from mqtt_persist.client import PersistentClient
from mqtt_persist.errors import ConnectTimeout
from mqtt_persist.message import Message
from mqtt_persist.stores.base import SessionStore

__all__ = ["FORMATS", "sub_command"]


def _payload(message: Message) -> bytes:
    return message.payload + b"\n"


def _topic_payload(message: Message) -> bytes:
    return message.topic.encode() + b" " + message.payload + b"\n"


def _json(message: Message) -> bytes:
    document: dict[str, object] = {
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "dup": message.dup,
    }
    try:
        document["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        document["payload_base64"] = base64.b64encode(message.payload).decode("ascii")
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


#: ``--format``: how one message is printed.
FORMATS: dict[str, Callable[[Message], bytes]] = {
    "payload": _payload,
    "topic": _topic_payload,
    "json": _json,
}


@click.command("sub")
@store_option()
@client_id_option
@click.option(
    "-t",
    "--topic",
    "topics",
    multiple=True,
    help="Filter to subscribe to (repeat for several; kept in the session). Without one, the "
    "session's stored subscriptions are used.",
)
@click.option(
    "-q", "--qos", type=click.IntRange(0, 2), default=1, show_default=True, help="QoS of -t."
)
@click.option(
    "-F",
    "--format",
    "output_format",
    type=click.Choice(sorted(FORMATS)),
    default="payload",
    show_default=True,
    help="payload: the payload; topic: topic and payload; json: one JSON object per line.",
)
@click.option("-C", "--count", type=click.IntRange(min=1), help="Stop after this many messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop after this many seconds (exit 6 if --count was not reached by then).",
)
@broker_options
def sub_command(
    store: SessionStore,
    client_id: str,
    topics: tuple[str, ...],
    qos: int,
    output_format: str,
    count: int | None,
    timeout: float | None,
    broker: BrokerOptions,
) -> int:
    """Print the messages of a persistent session until interrupted or --count."""
    render = FORMATS[output_format]
    out = sys.stdout.buffer

    async def run() -> tuple[int, int]:
        printed = extra = 0
        async with (
            PersistentClient(
                **broker.client_kwargs(), client_id=client_id, store=store, ack="manual"
            ) as client,
            _saying_once_while_waiting(client, broker.address),
        ):
            if topics:
                await client.subscribe([(t, qos) for t in topics])
            messages = client.messages
            with anyio.move_on_after(timeout):
                async for message in messages:
                    out.write(render(message))
                    out.flush()
                    await message.ack()
                    printed += 1
                    if printed == count:
                        break
            if printed == count:
                extra = await _already_received(messages)
        return printed, extra

    try:
        printed, extra = run_async(run)
    except Interrupted:
        return ExitCode.OK
    if extra:
        # Past --count: not acknowledged, so the broker delivers them to the next run.
        click.echo(
            f"mqtt-persist: {extra} more message(s) had arrived; not acknowledged, they come "
            "again with the next run (--count)",
            err=True,
        )
    if count is not None and printed < count:
        if timeout is None:  # the client stopped (its error was logged)
            raise CliError(f"the client stopped after {printed} of {count} message(s)")
        raise CliError(
            f"{printed} of {count} message(s) arrived within {timeout:g} s", ExitCode.TIMEOUT
        )
    return ExitCode.OK


#: Seconds without a connection after which ``sub`` says it waits, even if no attempt failed
#: yet (one to an unreachable host may take --connect-timeout).
SAY_WAITING_AFTER = 5.0


@asynccontextmanager
async def _saying_once_while_waiting(client: PersistentClient, address: str) -> AsyncIterator[None]:
    """For the block: one stderr line once the broker is not reached, not one per retry.

    The client retries for ever, so a broker that is down looked like a quiet one.
    """
    # A task, not a task group: the group would wrap the command's own error in an
    # ExceptionGroup, and that error is what the command's one stderr line must say.
    watcher = asyncio.create_task(_say_once_while_waiting(client, address))
    try:
        yield
    finally:
        watcher.cancel()
        await asyncio.wait([watcher])


async def _say_once_while_waiting(client: PersistentClient, address: str) -> None:
    waited = 0.0
    while True:
        try:
            await client.wait_connected(timeout=0.25)
        except ConnectTimeout as exc:
            waited += exc.waited
            if not exc.attempts and waited < SAY_WAITING_AFTER:
                continue
            why = f"last error: {exc.last_error}" if exc.last_error else "no answer yet"
            line = f"mqtt-persist: waiting for the broker {address} ({why}); retrying"
            click.echo(SECRETS.scrub(line), err=True)
        except Exception:  # the client stopped: the command reports why
            pass
        return


async def _already_received(messages: AsyncIterator[Message]) -> int:
    """Count the messages the client had already received, without waiting for more.

    The queued ones come without a wait; the first wait for a new one is cancelled at once.
    """
    extra = 0
    with anyio.move_on_after(0):
        async for _ in messages:
            extra += 1
    return extra
