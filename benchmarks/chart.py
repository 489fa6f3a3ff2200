"""A bar chart of one ``publish_throughput.py`` run, drawn from the JSON the run wrote.

    .venv/bin/python benchmarks/chart.py RUN.json [-o docs/benchmarks.png]

One horizontal bar per row: msg/s counted at the observer (the median of the run's repeats),
with the publisher's own acked msg/s as a tick where it differs by more than 5 %; the raw
``fdatasync`` loop in grey, ours in blue, the other clients in orange. mosquitto's ceilings
(the raw-socket blast rows) are dashed lines; the observer alone, hundreds of times faster,
is named in the legend instead of drawn. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: render to a file

import matplotlib.pyplot as plt

COLOURS = {"reference": "#8c8c8c", "ours": "#1f77b4"}
OTHER = "#ff7f0e"
CEILING_STYLE = {0: ("#2ca02c", "--"), 1: ("#d62728", "--")}


def _label(row: dict[str, Any]) -> str:
    window = {0: "unbounded", 1: "one at a time"}.get(row["window"], f"window {row['window']}")
    mode = row["mode"] if row["mode"] not in ("one at a time", "windowed") else window
    return f"{row['client']}, {mode}, QoS {row['qos']}"


def _thousands(value: float, _position: object) -> str:
    return f"{value / 1000:,.0f}k" if value else "0"


def draw(document: dict[str, Any], out: Path) -> None:
    """Render the rows of ``document`` (a run's JSON) to ``out`` (PNG)."""
    usable = [r for r in document["rows"] if not r["skipped"] and r["rate"]]
    references = {r["key"]: r for r in usable if r["key"].startswith(("observer-", "broker-"))}
    rows = [r for r in usable if r["key"] not in references]
    rows.reverse()  # barh draws bottom-up; keep the table's order top-down
    rates = [r["rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.36 * len(rows) + 2.2), dpi=110)
    ax.barh(range(len(rows)), rates, color=[COLOURS.get(r["family"], OTHER) for r in rows])
    ceilings = [references.get(f"broker-ceiling-qos{q}") for q in (0, 1)]
    top = max(rates + [c["rate"] for c in ceilings if c] + [r["acked_rate"] or 0 for r in rows])
    for i, row in enumerate(rows):
        acked = row["acked_rate"]
        text = f"{row['rate']:,.0f}"
        if acked and row["observed"] and abs(acked - row["rate"]) > 0.05 * row["rate"]:
            ax.plot([acked, acked], [i - 0.4, i + 0.4], color="black", linewidth=1.5)
            text += f" (acked {acked:,.0f})"
        if row["lost"] or row["duplicates"]:
            text += f"  LOST {row['lost']}, DUPLICATES {row['duplicates']}"
        ax.text(row["rate"] + top * 0.006, i, text, va="center", fontsize=7.5)
    for qos, ceiling in enumerate(ceilings):
        if ceiling:
            colour, style = CEILING_STYLE[qos]
            ax.axvline(
                ceiling["rate"],
                color=colour,
                linestyle=style,
                linewidth=1.2,
                label=f"mosquitto's ceiling at QoS {qos}: {ceiling['rate']:,.0f} msg/s "
                "(raw-socket blast)",
            )
    alone = references.get("observer-alone")
    if alone:
        ax.plot(
            [], [], " ", label=f"the observer alone: {alone['rate']:,.0f} msg/s (off the scale)"
        )
    ax.legend(loc="lower right", fontsize=8, framealpha=0.95)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=8)
    ax.set_xlim(0, top * 1.25)
    ax.xaxis.set_major_formatter(_thousands)
    ax.set_xlabel("messages per second arrived at the observer (median of repeats; | = acked)")
    settings = document["settings"]
    ax.set_title(
        f"mqtt_persist publish throughput: {settings['payload']}-byte payloads, "
        f"{settings['count']:,} messages x {settings['repeats']} per row, "
        f"one private mosquitto\n{document['started'][:16].replace('T', ' ')} UTC, "
        f"{document['machine']}",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="JSON written by publish_throughput.py")
    parser.add_argument("-o", "--out", type=Path, default=Path("docs/benchmarks.png"))
    args = parser.parse_args(argv)
    draw(json.loads(args.run.read_text()), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
