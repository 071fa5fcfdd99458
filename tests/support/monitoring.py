"""The shipped Prometheus rules and Grafana dashboard, read for tests: every query they
hold, as one list that the structure tests check and the live test evaluates.

A `Query` is named for where it comes from (`record NAME`, `panel "TITLE" REFID`,
`variable NAME`), so a list of names in a test can point at exact queries. Dashboard
expressions have their template variables replaced by what "All" selects.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.proxy import REPO

PROMETHEUS_DIR = REPO / "contrib" / "prometheus"
RULES = PROMETHEUS_DIR / "forkproxy-rules.yml"
ALERTS = PROMETHEUS_DIR / "forkproxy-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests"
DASHBOARD = REPO / "contrib" / "grafana" / "forkproxy.json"

# What Grafana puts in place of each variable when "All" is chosen, near enough for
# Prometheus: every value of the label.
ALL = {"instance": ".*", "listener": ".*", "target": ".*", "__rate_interval": "1m"}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$", re.S)


@dataclass(frozen=True, slots=True)
class Query:
    name: str  # where it comes from: record NAME, panel "TITLE" REFID, variable NAME
    expr: str  # PromQL, variables replaced
    label: str | None = None  # for a variable: the label whose values it lists


def promtool() -> str:
    """promtool's path; skips the test without it, fails it under CI."""
    return _tool("promtool")


def prometheus() -> str:
    """prometheus's path; skips the test without it, fails it under CI."""
    return _tool("prometheus")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (apt-get install prometheus) and $CI is set")
        pytest.skip(f"{name} is missing (Debian package prometheus)")
    return path


def rule_groups(path: Path) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    return groups


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(path) for rule in group["rules"]]


def recording_rules() -> list[dict[str, Any]]:
    return rules(RULES)


def alerting_rules() -> list[dict[str, Any]]:
    return rules(ALERTS)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included (rows themselves too)."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query a data source: all but rows."""
    return [panel for panel in panels(board) if panel["type"] != "row"]


def variables(board: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = board["templating"]["list"]
    return found


def instantiate(expr: str) -> str:
    """`expr` with each dashboard variable replaced by what "All" selects."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in ALL:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return ALL[name]

    return _VARIABLE.sub(replace, expr)


def variable_query(variable: dict[str, Any]) -> tuple[str, str]:
    """(series selector, label) of a label_values(SELECTOR, LABEL) variable."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text.strip())
    if match is None:
        raise ValueError(f"variable {variable['name']}: not label_values(...): {text!r}")
    return match.group(1).strip(), match.group(2)


def panel_queries(board: dict[str, Any]) -> list[Query]:
    return [
        Query(f'panel "{panel["title"]}" {target["refId"]}', instantiate(target["expr"]))
        for panel in query_panels(board)
        for target in panel["targets"]
    ]


def variable_queries(board: dict[str, Any]) -> list[Query]:
    found = []
    for variable in variables(board):
        if variable["type"] != "query":
            continue
        selector, label = variable_query(variable)
        found.append(Query(f"variable {variable['name']}", instantiate(selector), label))
    return found


def recording_rule_queries() -> list[Query]:
    """Each recording rule, queried by the name it records (so Prometheus must have
    loaded and evaluated it)."""
    return [Query(f"record {rule['record']}", rule["record"]) for rule in recording_rules()]


def all_queries() -> list[Query]:
    """Everything the live test evaluates: recording rules, panels, variables."""
    board = dashboard()
    return [*recording_rule_queries(), *panel_queries(board), *variable_queries(board)]
