"""What people read: aligned tables, times, sizes; and JSON for scripts.

Tables are plain aligned columns (no box drawing, no colour): they survive ``| grep``,
``| less`` and a serial console on an edge box, and need no library. ``--json`` output is one
JSON document per command on stdout, with times as Unix timestamps and sizes in bytes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

__all__ = [
    "echo",
    "echo_json",
    "format_size",
    "format_time",
    "format_until",
    "progress",
    "table",
]


def echo(text: str = "") -> None:
    """One line (or several) on stdout."""
    sys.stdout.write(text + "\n")


def echo_json(document: Any) -> None:
    """``document`` as JSON on stdout, one line."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "") -> str:
    """Rows under headers, in columns two spaces apart; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        and bool(rows)
        for i in range(len(headers))
    ]

    def line(texts: Sequence[str]) -> str:
        parts = [
            text.rjust(widths[i]) if numeric[i] else text.ljust(widths[i])
            for i, text in enumerate(texts)
        ]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # Control characters in a topic must not move the cursor of the terminal reading this.
    return str(value).translate(_CONTROL)


_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {127: "\\x7f"}


def format_time(timestamp: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for None."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_until(timestamp: float | None, now: float) -> str:
    """When something expires, for people: ``never``, ``in 3h 5m`` or ``expired 2m ago``."""
    if timestamp is None:
        return "never"
    delta = timestamp - now
    if delta <= 0:
        return f"expired {_span(-delta)} ago"
    return f"in {_span(delta)}"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def format_size(size: int) -> str:
    """Bytes for people: ``512 B``, ``4.2 KiB``, ``1.0 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def progress(
    enabled: bool | None, label: str
) -> Callable[[int], AbstractContextManager[Callable[[int], None]]]:
    """A progress-bar factory on stderr for ``total`` steps (see ``transfer.Progress``).

    ``enabled`` None: only when stderr is a terminal (never inside a pipe or a log file).
    """
    show = sys.stderr.isatty() if enabled is None else enabled

    @contextlib.contextmanager
    def bar(total: int) -> Iterator[Callable[[int], None]]:
        if not show:
            yield _ignore
            return
        import click

        with click.progressbar(length=total, label=label, file=sys.stderr) as shown:
            yield shown.update

    return bar


def _ignore(steps: int) -> None:
    """The progress of a run that shows none."""
