"""``mqtt-persist sessions ...``: list, show, delete, clean up, export and import sessions."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import click

from mqtt_persist.cli.access import holding, opened
from mqtt_persist.cli.exits import CliError, ExitCode
from mqtt_persist.cli.inspect import describe_info, describe_session, protocol_name
from mqtt_persist.cli.options import json_option, progress_option, store_option
from mqtt_persist.cli.render import (
    echo,
    echo_json,
    format_size,
    format_time,
    format_until,
    progress,
    table,
)
from mqtt_persist.cli.running import run_async
from mqtt_persist.cli.transfer import export_session, import_session
from mqtt_persist.stores.base import SessionStore

__all__ = ["sessions"]


@click.group()
def sessions() -> None:
    """Look at and manage the sessions in a store."""


# --- list ------------------------------------------------------------------------------------


@sessions.command("list")
@store_option()
@json_option
def list_command(store: SessionStore, as_json: bool) -> None:
    """Every session in the store, with its queue and expiry."""

    async def run() -> list[dict[str, Any]]:
        async with opened(store):
            infos = await store.list_sessions()
        now = time.time()
        return [describe_info(i, now) for i in sorted(infos, key=lambda i: i.client_id)]

    rows = run_async(run)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        echo("no sessions")
        return
    now = time.time()
    echo(
        table(
            ["CLIENT ID", "QUEUED", "IN FLIGHT", "SET ASIDE", "LAST ACCESS", "EXPIRES"],
            [
                [
                    r["client_id"],
                    r["queued"],
                    r["inflight"],
                    r["set_aside"],
                    format_time(r["last_access"]),
                    format_until(r["expires_at"], now),
                ]
                for r in rows
            ],
        )
    )


# --- show ------------------------------------------------------------------------------------


@sessions.command("show")
@click.argument("client_id")
@store_option()
@json_option
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Queued messages to list (0: all); all are counted.",
)
def show_command(client_id: str, store: SessionStore, as_json: bool, limit: int) -> None:
    """What one session holds: messages queued, in flight and set aside, subscriptions, ..."""

    async def run() -> dict[str, Any]:
        async with opened(store):
            return await describe_session(store, client_id, queued_shown=limit or None)

    view = run_async(run)
    if as_json:
        echo_json(view)
    else:
        echo(_show_text(view))


def _show_text(v: dict[str, Any]) -> str:
    now = time.time()
    expires = v["expires_at"]
    lines = [
        f"session {v['client_id']}",
        f"  protocol      {protocol_name(v['protocol_version'])}",
        f"  created       {format_time(v['created_at'])}",
        f"  last access   {format_time(v['last_access'])}",
        f"  expires       {format_until(expires, now)}"
        + (f" ({format_time(expires)})" if expires else ""),
        f"  messages      {v['queued_count']} queued, {v['inflight_count']} in flight, "
        f"{v['set_aside_count']} set aside; {format_size(v['payload_bytes'])} of payload",
    ]
    if v["inflight"]:
        lines += ["", f"in flight ({v['inflight_count']})"]
        lines.append(
            table(
                ["SEQ", "PACKET ID", "QOS", "STATE", "SIZE", "TOPIC"],
                [
                    [m["seq"], m["packet_id"], m["qos"], m["state"], m["size"], m["topic"]]
                    for m in v["inflight"]
                ],
                indent="  ",
            )
        )
    if v["queued_count"]:
        shown = len(v["queued"])
        more = "" if shown == v["queued_count"] else f"; the first {shown} shown"
        lines += ["", f"queued ({v['queued_count']}{more})"]
        lines.append(
            table(
                ["SEQ", "QOS", "RETAIN", "SIZE", "TOPIC"],
                [[m["seq"], m["qos"], m["retain"], m["size"], m["topic"]] for m in v["queued"]],
                indent="  ",
            )
        )
    if v["set_aside"]:
        lines += ["", f"set aside ({v['set_aside_count']})"]
        lines.append(
            table(
                ["SEQ", "QOS", "SIZE", "SET ASIDE AT", "TOPIC", "REASON"],
                [
                    [a["seq"], a["qos"], a["size"], format_time(a["at"]), a["topic"], a["reason"]]
                    for a in v["set_aside"]
                ],
                indent="  ",
            )
        )
    if v["subscriptions"]:
        lines += ["", f"subscriptions ({len(v['subscriptions'])})"]
        lines.append(
            table(
                ["FILTER", "QOS", "CONFIRMED", "NO LOCAL", "RAP", "RH", "SUB ID"],
                [
                    [
                        s["topic_filter"],
                        s["qos"],
                        s["confirmed"],
                        s["no_local"],
                        s["retain_as_published"],
                        s["retain_handling"],
                        s["subscription_id"],
                    ]
                    for s in v["subscriptions"]
                ],
                indent="  ",
            )
        )
    if v["pending_unsubscribes"]:
        lines += ["", "pending unsubscribes: " + ", ".join(v["pending_unsubscribes"])]
    if v["inbound_qos2"]:
        ids = ", ".join(str(i) for i in v["inbound_qos2"])
        lines += ["", f"inbound QoS 2 awaiting PUBREL, packet ids: {ids}"]
    return "\n".join(lines)


# --- delete and cleanup ----------------------------------------------------------------------


@sessions.command("delete")
@click.argument("client_ids", nargs=-1, required=True, metavar="CLIENT_ID...")
@store_option()
@json_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def delete_command(
    client_ids: tuple[str, ...], store: SessionStore, as_json: bool, yes: bool
) -> None:
    """Delete sessions (refused for one a live client holds)."""
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("deleting needs --yes when not asked on a terminal", ExitCode.USAGE)
        click.confirm(f"Delete {len(client_ids)} session(s): {', '.join(client_ids)}?", abort=True)

    async def run() -> list[str]:
        deleted: list[str] = []
        wanted = list(dict.fromkeys(client_ids))
        async with opened(store), contextlib.AsyncExitStack() as leases:
            # Every session is checked and leased before any is deleted: exit 3 or 4 means
            # nothing was changed, not that the sessions named before that one are gone.
            for client_id in wanted:
                await _listed(store, client_id)
            for client_id in wanted:
                await leases.enter_async_context(holding(store, client_id))
            for client_id in wanted:
                await store.delete(client_id)
                deleted.append(client_id)
        return deleted

    deleted = run_async(run)
    if as_json:
        echo_json({"deleted": deleted})
    else:
        for client_id in deleted:
            echo(f"deleted session {client_id}")


async def _listed(store: SessionStore, client_id: str) -> None:
    """NO_SESSION unless listed; unlike ``find_session``, an expired session can be deleted."""
    if not any(i.client_id == client_id for i in await store.list_sessions()):
        raise CliError(f"no session {client_id!r} in this store", ExitCode.NO_SESSION)


@sessions.command("cleanup")
@store_option()
@json_option
def cleanup_command(store: SessionStore, as_json: bool) -> None:
    """Remove expired sessions (those a live client holds are left alone)."""

    async def run() -> int:
        async with opened(store):
            return await store.cleanup_expired()

    removed = run_async(run)
    if as_json:
        echo_json({"removed": removed})
    else:
        echo(f"removed {removed} expired session(s)")


# --- export and import -----------------------------------------------------------------------


@sessions.command("export")
@click.argument("client_id")
@store_option()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to this file (default: stdout); written whole or not at all.",
)
@progress_option
def export_command(
    client_id: str, store: SessionStore, output: Path | None, show_progress: bool | None
) -> None:
    """Write a session as JSON Lines (the format is in docs/cli.md)."""
    bar = progress(show_progress, "exporting")

    async def run(out: BinaryIO) -> int:
        async with opened(store):
            header = await export_session(store, client_id, out, bar)
        return header.records

    if output is None:
        records = run_async(lambda: run(sys.stdout.buffer))
        sys.stdout.buffer.flush()
    else:
        # A temporary file renamed into place: a failed export leaves no half file behind.
        try:
            fd, temporary = tempfile.mkstemp(dir=output.parent or ".", prefix=f".{output.name}.")
        except OSError as exc:
            # The temporary file is ours, not the user's: name the path they gave.
            raise CliError(f"cannot write {output}: {exc.strerror or exc}", ExitCode.USAGE) from exc
        try:
            with os.fdopen(fd, "wb") as out:
                records = run_async(lambda: run(out))
            os.replace(temporary, output)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    click.echo(f"exported session {client_id}: {records} record(s)", err=True)


@sessions.command("import")
@click.argument("file", type=click.File("rb"))
@store_option()
@click.option("--replace", is_flag=True, help="Replace a session with the same client id.")
@click.option("-i", "--client-id", help="Store it under this client id instead of the file's.")
@json_option
@progress_option
def import_command(
    file: BinaryIO,
    store: SessionStore,
    replace: bool,
    client_id: str | None,
    as_json: bool,
    show_progress: bool | None,
) -> None:
    """Store a session exported with `sessions export` (FILE may be - for stdin)."""
    bar = progress(show_progress, "importing")
    with tempfile.TemporaryFile() as spool:
        source = file
        if not file.seekable():
            # Import reads the file twice (check, then store): keep a pipe's bytes on disk.
            shutil.copyfileobj(file, spool)
            spool.seek(0)
            source = spool

        async def run() -> tuple[int, str]:
            async with opened(store, create=True):
                header, target = await import_session(
                    store, source, bar, replace=replace, client_id=client_id
                )
            return header.records, target

        records, target = run_async(run)
    if as_json:
        echo_json({"client_id": target, "records": records})
    else:
        echo(f"imported session {target}: {records} record(s)")
