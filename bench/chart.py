"""`python -m bench.chart RESULTS.json [MORE.json ...] FILE.svg`: bench.compare's results drawn.

Each relay a bar: throughput above (bulk, keep-alive, churn), the CPU it spent per unit of
that work below (user plain, system hatched), the no-proxy ceiling as a dashed line where it
applies, system calls per churned connection beside them when measured. Medians of the
rounds, whiskers from min to max; every bar is named and carries its value, so the chart
reads without colour. Works from the JSON alone (several files merge as in bench.report);
never runs anything. matplotlib is an optional bench dependency, imported only to draw.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench import report
from bench.report import CEILING, REFERENCE, Document, Row

INSTALL_HINT = "pip install -e '.[bench]' in the venv (or pip install matplotlib)"
# (load, throughput key, CPU-per-work key), one column each.
COLUMNS = (
    ("bulk", "gbit_s", "cpu_s_per_10gib"),
    ("keepalive", "req_s", "cpu_us_per_request"),
    ("churn", "conn_s", "cpu_us_per_conn"),
)
SYSCALLS = ("syscalls", "syscalls_per_conn")
FORKPROXY_FILL = "#4c72b0"
OTHER_FILL = "#bbbbbb"
SYSTEM_HATCH = "////"


class ChartError(RuntimeError):
    """Nothing in the results can be drawn; the message says why."""


def missing_matplotlib() -> str | None:
    """None when matplotlib can be imported, else how to install it."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"matplotlib is not installed (an optional bench dependency): {INSTALL_HINT}"
    return None


def draw(doc: Document, path: Path) -> None:
    """Write the chart of `doc` to `path` (SVG, or any format matplotlib knows by suffix)."""
    problem = missing_matplotlib()
    if problem:
        raise ChartError(problem)
    import matplotlib
    from matplotlib.figure import Figure

    table = report.rows(doc)
    found = {(row.load, row.key) for row in table}
    columns = [column for column in COLUMNS if (column[0], column[1]) in found]
    with_syscalls = SYSCALLS in found
    if not columns and not with_syscalls:
        raise ChartError("the results hold no bulk, keepalive, churn or syscalls figure")
    width = len(columns) + (1 if with_syscalls else 0)
    # Files from before CPU accounting have throughput only: one row then.
    height = 2 if any((load, cost) in found for load, _, cost in columns) else 1
    # Fixed ids and no date in the file: the same results give the same bytes.
    with matplotlib.rc_context({"svg.hashsalt": "forkproxy-bench", "font.size": 8}):
        figure = Figure(figsize=(4.4 * width, 1.0 + 3.4 * height), layout="constrained")
        grid = figure.add_gridspec(height, width)
        for index, (load, figure_key, cost_key) in enumerate(columns):
            _panel(figure.add_subplot(grid[0, index]), table, load, figure_key)
            if height == 2:
                _panel(figure.add_subplot(grid[1, index]), table, load, cost_key)
        if with_syscalls:
            _panel(figure.add_subplot(grid[0, width - 1]), table, *SYSCALLS)
        # supxlabel, unlike a free text, gets room from the constrained layout.
        figure.supxlabel(_caption(doc, int(19 * 4.4 * width)), x=0.01, ha="left", fontsize=7)
        settings = doc["settings"]
        figure.suptitle(
            f"forkproxy side by side: medians of {settings['rounds']} rounds × "
            f"{settings['duration']:g} s, whiskers min … max, ratios to {REFERENCE}",
            fontsize=10,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)


def _panel(axes: Any, table: list[Row], load: str, key: str) -> None:
    from matplotlib.patches import Patch

    mine = [row for row in table if row.load == load and row.key == key]
    bars = [row for row in mine if row.contender != CEILING]
    if not bars:
        axes.set_axis_off()
        return
    first = bars[0]
    positions = list(range(len(bars)))
    medians = [row.median or 0.0 for row in bars]
    fills = [_fill(row.contender) for row in bars]
    if first.cpu_split is not None or any(row.cpu_split for row in bars):
        # The parts are medians of their own; scaled so that they fill the median bar.
        user = [_user_share(row) * median for row, median in zip(bars, medians, strict=True)]
        system = [median - part for part, median in zip(user, medians, strict=True)]
        axes.barh(positions, user, color=fills, edgecolor="black")
        axes.barh(
            positions, system, left=user, color="white", edgecolor="black", hatch=SYSTEM_HATCH
        )
        axes.legend(
            handles=[
                Patch(facecolor=OTHER_FILL, edgecolor="black", label="user"),
                Patch(facecolor="white", edgecolor="black", hatch=SYSTEM_HATCH, label="system"),
            ],
            loc="upper right",
            ncols=2,
            fontsize=7,
            frameon=False,
        )
    else:
        axes.barh(positions, medians, color=fills, edgecolor="black")
    low = [row.median - min(row.samples) if row.samples and row.median else 0 for row in bars]
    high = [max(row.samples) - row.median if row.samples and row.median else 0 for row in bars]
    axes.errorbar(medians, positions, xerr=[low, high], fmt="none", ecolor="black", capsize=2)
    for position, row in zip(positions, bars, strict=True):
        value = max(row.samples) if row.samples else 0.0
        text = report.value_text(row, row.median)
        relative = report.ratio(row, REFERENCE, table)
        if row.contender != REFERENCE and relative != "—":
            text += f" ({relative})"
        axes.annotate(
            text,
            (value, position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            # Over the ceiling's dashed line, not under it.
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            zorder=3,
        )
    ceiling = next((row for row in mine if row.contender == CEILING and row.median), None)
    if ceiling is not None and ceiling.median is not None:
        axes.axvline(ceiling.median, color="black", linestyle="--", linewidth=1)
        axes.annotate(
            f"direct, no proxy: {report.value_text(ceiling, ceiling.median)}",
            (ceiling.median, -0.6),
            xytext=(-3, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=7,
        )
    top = max([*medians, *(max(row.samples) for row in bars if row.samples)])
    if ceiling is not None and ceiling.median is not None:
        top = max(top, ceiling.median)
    axes.set_xlim(0, top * 1.45 if top > 0 else 1)
    axes.set_ylim(len(bars) - 0.5, -1.1)
    axes.set_yticks(positions, [row.contender for row in bars])
    axes.xaxis.set_major_formatter("{x:,g}")
    better = "higher" if first.higher_is_better else "lower"
    axes.set_xlabel(f"{first.unit}, {better} is better")
    axes.set_title(first.label, fontsize=9)


def _user_share(row: Row) -> float:
    if row.cpu_split is None or sum(row.cpu_split) <= 0:
        return 0.0
    return row.cpu_split[0] / sum(row.cpu_split)


def _fill(contender: str) -> str:
    return FORKPROXY_FILL if contender.startswith("forkproxy") else OTHER_FILL


def _caption(doc: Document, line_chars: int) -> str:
    machine = doc["machine"]
    versions = doc["versions"]
    tools = [
        " ".join(versions[name].split()[:3])
        for name in ("systemd-socket-proxyd", "haproxy", "nginx", "forkproxy")
        if versions.get(name)
    ]
    parts = [
        f"{doc['started']}",
        f"{machine['cores']} cores, {machine['cpu_model']}, Linux {machine['kernel']}",
        f"forkproxy source {versions.get('forkproxy-source', '?')}",
        *tools,
        "CPU: user + system time of each relay's process tree over the load, "
        "divided by the work; kernel work done in softirq context may be charged elsewhere "
        "(docs/bench.md)",
    ]
    return textwrap.fill("; ".join(parts), line_chars)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or any(arg.startswith("-") for arg in args):
        print("usage: python -m bench.chart RESULTS.json [MORE.json ...] FILE.svg", file=sys.stderr)
        return 2
    *sources, output = (Path(arg) for arg in args)
    docs = []
    for source in sources:
        try:
            docs.append(json.loads(source.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            print(f"bench.chart: cannot read {source}: {error}", file=sys.stderr)
            return 2
    try:
        draw(report.merge(docs), output)
    except (ChartError, OSError) as error:
        print(f"bench.chart: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
