"""``mqtt-persist pub``: publish durably from a shell script.

Exit 0 means every message is in the store: this run sends what it can before it leaves
(``--linger``), and whatever the broker has not acknowledged by then is sent by the next run,
or the next client, with the same client id and store. So a script on an edge box can publish
with the broker down and still count on delivery. ``--wait-ack`` also waits for the broker's
acknowledgement of this run's messages. QoS 0 is refused: it is never stored.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import click

from mqtt_persist.cli.broker import BrokerOptions
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.options import broker_options, client_id_option, json_option, store_option
from mqtt_persist.cli.render import echo, echo_json
from mqtt_persist.cli.running import run_async
from mqtt_persist.client import PersistentClient
from mqtt_persist.completion import Delivery
from mqtt_persist.errors import MqttPersistError
from mqtt_persist.message import DeliveryOutcome
from mqtt_persist.stores.base import SessionStore

__all__ = ["pub_command"]

#: Lines published together (one commit shared by all of them), at most.
STDIN_BATCH = 1000
_READ_SIZE = 1 << 16


@click.command("pub")
@store_option()
@client_id_option
@click.option("-t", "--topic", required=True, help="Topic to publish to.")
@click.option("-m", "--message", "messages", multiple=True, help="A message (repeat for several).")
@click.option(
    "-l",
    "--stdin-lines",
    "stdin_lines",
    is_flag=True,
    help="Publish each line of stdin as one message, as it arrives (blank lines are skipped).",
)
@click.option(
    "-q", "--qos", type=click.IntRange(1, 2), default=1, show_default=True, help="QoS 1 or 2."
)
@click.option("-r", "--retain", is_flag=True, help="Ask the broker to retain the messages.")
@click.option(
    "--wait-ack",
    is_flag=True,
    help="Also wait for the broker's acknowledgement of every message (see --timeout).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="With --wait-ack: seconds to wait for the acknowledgements (exit 6 past it).",
)
@click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Without --wait-ack: seconds to try sending before leaving the rest to a later run.",
)
@broker_options
@json_option
def pub_command(
    store: SessionStore,
    client_id: str,
    topic: str,
    messages: tuple[str, ...],
    stdin_lines: bool,
    qos: int,
    retain: bool,
    wait_ack: bool,
    timeout: float,
    linger: float,
    broker: BrokerOptions,
    as_json: bool,
) -> int:
    """Publish messages durably (exit 0 once every one is in the store)."""
    if bool(messages) == stdin_lines:
        raise CliError("give the messages with -m MESSAGE or -l (lines of stdin)", ExitCode.USAGE)
    if not getattr(store, "durable", True):
        raise CliError(
            "pub needs a durable store: memory:// keeps nothing after this process",
            ExitCode.USAGE,
        )
    payloads = _stdin_lines() if stdin_lines else _given(messages)

    async def run() -> dict[str, Any]:
        async with PersistentClient(
            **broker.client_kwargs(), client_id=client_id, store=store
        ) as client:
            deliveries = await _publish_all(client, topic, payloads, qos, retain, wait_ack)
            report: dict[str, Any] = {"client_id": client_id, "stored": len(deliveries)}
            if wait_ack:
                report |= await _acknowledgements(deliveries, timeout)
            else:
                with anyio.move_on_after(linger):
                    await client.drain()
            stats = client.stats
            report["unsent"] = stats.queued + stats.inflight
            report["connected"] = stats.connections > 0
        return report

    report = run_async(run)
    if as_json:
        echo_json(report)
    else:
        echo(_summary(report, broker))
    if report.get("timed_out"):
        return ExitCode.TIMEOUT
    if report.get("not_acknowledged"):
        return ExitCode.FAILED
    return ExitCode.OK


async def _given(messages: tuple[str, ...]) -> AsyncIterator[list[bytes]]:
    yield [m.encode() for m in messages]


async def _stdin_lines() -> AsyncIterator[list[bytes]]:
    """Batches of stdin's lines, each batch what had arrived, as soon as it arrived."""
    # read1: whatever has arrived (at least one byte), so a slow pipe is published as it comes.
    stream = cast(io.BufferedReader, sys.stdin.buffer)
    # The start of an unfinished line, in pieces: joined once its end arrives, since gluing
    # each read to the ones before would copy a long line over and over (quadratic time).
    pieces: list[bytes] = []
    while True:
        chunk = await anyio.to_thread.run_sync(stream.read1, _READ_SIZE)
        if not chunk:
            break
        if b"\n" not in chunk:
            pieces.append(chunk)
            continue
        *lines, rest = b"".join([*pieces, chunk]).split(b"\n")
        pieces = [rest]
        batch = [line.removesuffix(b"\r") for line in lines if line.strip(b"\r")]
        for start in range(0, len(batch), STDIN_BATCH):
            yield batch[start : start + STDIN_BATCH]
    last = b"".join(pieces).removesuffix(b"\r")
    if last:
        yield [last]


async def _publish_all(
    client: PersistentClient,
    topic: str,
    batches: AsyncIterator[list[bytes]],
    qos: int,
    retain: bool,
    keep: bool,
) -> list[Delivery | None]:
    """Publish every batch; each batch concurrently, so its messages share one commit.

    The tasks of a batch start in order and each takes its place in the queue before its
    first wait, so the messages keep their order (the README's "publish concurrently").
    """
    deliveries: list[Delivery | None] = []
    async for batch in batches:
        try:
            published = await asyncio.gather(
                *(client.publish(topic, payload, qos, retain) for payload in batch)
            )
        except MqttPersistError as exc:
            raise CliError(
                f"{exc} (stored before this: {len(deliveries)} message(s), sent by this or a "
                "later run)",
                ExitCode.USAGE if isinstance(exc, ValueError) else ExitCode.FAILED,
            ) from exc
        deliveries += published if keep else [None] * len(published)
    return deliveries


async def _acknowledgements(deliveries: list[Delivery | None], timeout: float) -> dict[str, Any]:
    """Wait for every delivery's outcome: how many were acknowledged, and what went wrong.

    A QoS 2 message the broker took at QoS 1 (``DOWNGRADED``: RabbitMQ does that) was
    acknowledged by it, so it counts as acknowledged; ``downgraded`` says how many were.
    """
    acknowledged = downgraded = 0
    not_acknowledged: list[str] = []
    with anyio.move_on_after(timeout) as scope:
        for delivery in deliveries:
            assert delivery is not None
            outcome = await delivery
            if outcome is DeliveryOutcome.ACKNOWLEDGED:
                acknowledged += 1
            elif outcome is DeliveryOutcome.DOWNGRADED:
                acknowledged += 1
                downgraded += 1
            else:
                not_acknowledged.append(outcome.value)
    return {
        "acknowledged": acknowledged,
        "downgraded": downgraded,
        "not_acknowledged": not_acknowledged,
        "timed_out": scope.cancelled_caught,
    }


def _summary(report: dict[str, Any], broker: BrokerOptions) -> str:
    text = f"stored {report['stored']} message(s) for client {report['client_id']!r}"
    if "acknowledged" in report:
        text += f"; {report['acknowledged']} acknowledged by {broker.address}"
        if report["downgraded"]:
            text += f" ({report['downgraded']} of them taken at QoS 1, not 2)"
        if report["not_acknowledged"]:
            text += f"; not acknowledged: {', '.join(report['not_acknowledged'])}"
        if report["timed_out"]:
            text += " before the timeout"
    unsent = report["unsent"]
    # Nothing unsent may also mean nothing was ever queued: no broker acknowledged anything.
    if not unsent and "acknowledged" not in report and report["connected"]:
        text += f"; all sent and acknowledged by {broker.address}"
    if unsent:
        reached = "" if report["connected"] else f"; broker {broker.address} not reached"
        text += (
            f"; {unsent} queued in the store, sent by the next run with this client id and "
            f"store{reached}"
        )
    return text
