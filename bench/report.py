"""Tables of medians and ratios from a results document, and the document's JSON file.

Works from the JSON alone, so `python -m bench.report FILE...` re-renders (and merges) saved
runs. Never runs anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.contenders import CONTENDER_NAMES

Document = dict[str, Any]  # parsed JSON, as runner.document() builds it
REFERENCE = "socket-proxyd"
CEILING = "direct"


@dataclass(frozen=True, slots=True)
class Row:
    load: str
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int
    contender: str
    samples: tuple[float, ...]
    failures: int
    cpu_percent: float | None
    at_limit: bool
    # Medians of the user and system parts of a CPU-per-work figure.
    cpu_split: tuple[float, float] | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def rows(doc: Document) -> list[Row]:
    """One row per (load metric, contender) that was measured or failed."""
    samples: list[dict[str, Any]] = doc["samples"]
    loads: dict[str, dict[str, Any]] = doc["loads"]
    present = {str(sample["contender"]) for sample in samples}
    contenders = [name for name in CONTENDER_NAMES if name in present]
    contenders += sorted(present - set(contenders))
    found: list[Row] = []
    for load_name, load in loads.items():
        for metric in load["metrics"]:
            for contender in contenders:
                if metric.get("proxies_only") and contender == CEILING:
                    continue
                mine = [
                    s for s in samples if s["load"] == load_name and s["contender"] == contender
                ]
                if not mine:
                    continue
                # A sample may lack a figure its file's load did not have yet (merged runs).
                good = [s for s in mine if s["ok"] and metric["key"] in s["values"]]
                failures = sum(1 for s in mine if not s["ok"])
                if not good and not failures:
                    continue
                found.append(
                    Row(
                        load=load_name,
                        key=metric["key"],
                        label=metric["label"],
                        unit=metric["unit"],
                        higher_is_better=metric["higher_is_better"],
                        digits=metric["digits"],
                        contender=contender,
                        samples=tuple(float(s["values"][metric["key"]]) for s in good),
                        failures=failures,
                        cpu_percent=_median_of(good, "proxy_cpu_percent"),
                        at_limit=bool(good) and all(s["extra"].get("reached_limit") for s in good),
                        cpu_split=_split(good) if metric.get("cpu_cost") else None,
                    )
                )
    return found


def _split(samples: list[dict[str, Any]]) -> tuple[float, float] | None:
    parts = [s["cpu_split"] for s in samples if s.get("cpu_split")]
    if not parts:
        return None
    return (
        statistics.median(part["user"] for part in parts),
        statistics.median(part["system"] for part in parts),
    )


def _median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    found = [float(s[key]) for s in samples if s.get(key) is not None]
    return statistics.median(found) if found else None


def ratio(row: Row, reference: str, table: list[Row]) -> str:
    ref = next(
        (r for r in table if r.key == row.key and r.load == row.load and r.contender == reference),
        None,
    )
    if ref is None or not ref.median or row.median is None:
        return "—"
    return f"{row.median / ref.median:.2f}×"


def value_text(row: Row, value: float | None) -> str:
    if value is None:
        return "failed"
    text = f"{value:,.{row.digits}f}"
    return f"≥{text}" if row.at_limit else text


def render_long(doc: Document) -> str:
    """Markdown: every (metric, contender) with median, spread, ratios and proxy CPU.

    proxy CPU is the user+system time of the proxy's process tree, as a share of one core;
    a CPU-per-work median also shows its user and system parts (medians of their own).
    """
    table = rows(doc)
    lines = [
        "| load | contender | median | unit | min … max | n | vs socket-proxyd | vs direct "
        "| proxy CPU |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        spread = (
            f"{value_text(row, min(row.samples))} … {value_text(row, max(row.samples))}"
            if row.samples
            else "—"
        )
        direction = "↑" if row.higher_is_better else "↓"
        count = f"{len(row.samples)}" + (f" ({row.failures} failed)" if row.failures else "")
        median = value_text(row, row.median)
        if row.cpu_split is not None:
            user, system = row.cpu_split
            median += f" (user {user:,.{row.digits}f} + sys {system:,.{row.digits}f})"
        lines.append(
            f"| {row.label} | {row.contender} | {median} | {row.unit} "
            f"{direction} | {spread} | {count} | {ratio(row, REFERENCE, table)} "
            f"| {ratio(row, CEILING, table)} | {_percent(row.cpu_percent)} |"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "—"


def render_matrix(doc: Document) -> str:
    """Markdown: one row per metric, one column per contender, median (ratio to socket-proxyd)."""
    table = rows(doc)
    contenders: list[str] = []
    for row in table:
        if row.contender not in contenders:
            contenders.append(row.contender)
    metrics: list[tuple[str, str]] = []
    for row in table:
        if (row.load, row.key) not in metrics:
            metrics.append((row.load, row.key))
    lines = [
        "| metric | " + " | ".join(contenders) + " |",
        "| --- |" + " ---: |" * len(contenders),
    ]
    for load, key in metrics:
        mine = {r.contender: r for r in table if r.load == load and r.key == key}
        first = next(iter(mine.values()))
        direction = "↑" if first.higher_is_better else "↓"
        cells = []
        for contender in contenders:
            found = mine.get(contender)
            if found is None:
                cells.append("n/a")
                continue
            cell = value_text(found, found.median)
            if contender != REFERENCE and found.median is not None:
                relative = ratio(found, REFERENCE, table)
                cell += f" ({relative})" if relative != "—" else ""
            cells.append(cell)
        lines.append(f"| {first.label}, {first.unit} {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_syscalls(doc: Document, least: float = 0.05) -> str:
    """Markdown: system calls per churned connection by name, medians over rounds, one
    column per contender; calls below `least` per connection everywhere are left out."""
    by_contender: dict[str, list[dict[str, Any]]] = {}
    for sample in doc["samples"]:
        if sample["load"] == "syscalls" and sample["ok"]:
            by_contender.setdefault(sample["contender"], []).append(sample)
    if not by_contender:
        return ""
    contenders = [name for name in CONTENDER_NAMES if name in by_contender]
    contenders += sorted(set(by_contender) - set(contenders))
    per_connection: dict[str, dict[str, float]] = {}
    for contender in contenders:
        mine = by_contender[contender]
        names = {name for s in mine for name in s["extra"]["calls"]}
        per_connection[contender] = {
            name: statistics.median(
                s["extra"]["calls"].get(name, 0) / s["extra"]["connections"] for s in mine
            )
            for name in names
        }
    ordered = sorted(
        {name for calls in per_connection.values() for name in calls},
        key=lambda name: -max(calls.get(name, 0.0) for calls in per_connection.values()),
    )
    lines = [
        "| system calls per churned connection | " + " | ".join(contenders) + " |",
        "| --- |" + " ---: |" * len(contenders),
    ]
    for name in ordered:
        cells = [per_connection[c].get(name, 0.0) for c in contenders]
        if max(cells) >= least:
            lines.append(f"| {name} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    totals = [
        statistics.median(s["values"]["syscalls_per_conn"] for s in by_contender[c])
        for c in contenders
    ]
    idle = [
        statistics.median(s["extra"]["idle_calls_per_connection"] for s in by_contender[c])
        for c in contenders
    ]
    lines.append("| **total** | " + " | ".join(f"**{total:.1f}**" for total in totals) + " |")
    idle_cells = " | ".join(f"{calls:.2f}" for calls in idle)
    lines.append(f"| of which the tree makes with no traffic (estimate) | {idle_cells} |")
    return "\n".join(lines)


def header(doc: Document) -> str:
    machine = doc["machine"]
    settings = doc["settings"]
    versions = doc["versions"]
    tools = ", ".join(
        f"{name}: {versions[name]}"
        for name in (
            "systemd-socket-proxyd",
            "forkproxy",
            "haproxy",
            "nginx",
            "wrk",
            "iperf3",
            "strace",
        )
        if name in versions
    )
    runs = f" ({doc['merged_runs']} runs merged)" if doc.get("merged_runs", 1) > 1 else ""
    return (
        f"{doc['started']}{runs} on {machine['cores']} cores ({machine['cpu_model']}), "
        f"Linux {machine['kernel']}; {settings['rounds']} rounds × {settings['duration']:g} s, "
        f"nofile {settings['nofile']}, cap {settings['max_connections']}, loadavg "
        f"{doc['loadavg_start']} → {doc['loadavg_end']}\n{tools}\n"
        "ratios: median ÷ the reference's median (↑ higher is better, ↓ lower is better); "
        "≥ means every sample reached the test's limit"
    )


def failures(doc: Document) -> list[str]:
    return [
        f"round {s['round']} {s['load']} {s['contender']}: {s['error']}"
        for s in doc["samples"]
        if not s["ok"]
    ]


def write(doc: Document, path: Path) -> None:
    """Write atomically: a half-written results file never lands under bench/results/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def merge(docs: list[Document]) -> Document:
    """Samples of several runs (e.g. split by --only) under the first run's header."""
    merged = dict(docs[0])
    merged["samples"] = [s for doc in docs for s in doc["samples"]]
    merged["loads"] = {k: v for doc in docs for k, v in doc["loads"].items()}
    merged["loadavg_end"] = docs[-1]["loadavg_end"]
    merged["merged_runs"] = len(docs)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-render saved bench.compare results.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--format", choices=("long", "matrix", "both"), default="both")
    args = parser.parse_args()
    docs = []
    for path in args.files:
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            parser.exit(2, f"bench.report: cannot read {path}: {error}\n")
    doc = merge(docs)
    print(header(doc), end="\n\n")
    if args.format in ("matrix", "both"):
        print(render_matrix(doc), end="\n\n")
    if args.format in ("long", "both"):
        print(render_long(doc))
    if syscalls := render_syscalls(doc):
        print("\n" + syscalls)


if __name__ == "__main__":
    main()
