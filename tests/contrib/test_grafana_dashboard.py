"""contrib/grafana/forkproxy.json: a current Grafana dashboard whose every query goes to
the `datasource` variable, follows the instance/listener/target variables, reads the
recording rules where there are some, and parses; and the list of every query in it and
in the recording rules, which tests/integration/test_dashboard.py evaluates."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.monitoring import (
    Query,
    all_queries,
    dashboard,
    panel_queries,
    panels,
    promtool,
    query_panels,
    recording_rules,
    variable_query,
    variables,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MATCHER = re.compile(r'\b(instance|listener|target)\s*(=~|!~|!=|=)\s*"([^"]*)"')
RECORDED = re.compile(r"\bforkproxy:\w+:\w+")


def test_current_schema_with_a_stable_uid() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "forkproxy"
    assert board["title"] == "forkproxy"
    assert board["id"] is None  # imported anywhere: Grafana gives it an id


def test_variables_datasource_instance_listener_target() -> None:
    found = {variable["name"]: variable for variable in variables(dashboard())}
    assert list(found) == ["datasource", "instance", "listener", "target"]
    source = found.pop("datasource")
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for name, variable in found.items():
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        assert variable["includeAll"] and variable["multi"], name
        selector, label = variable_query(variable)
        assert label == name
        assert variable["definition"] == variable["query"]["query"], name
        if name != "instance":
            assert 'instance=~"$instance"' in selector, name
    # The instance variable lists forkproxy instances only (its "All" is their list,
    # so a panel's up{instance=~"$instance"} shows no other job).
    assert "allValue" not in found["instance"]


def test_panels_query_the_datasource_variable() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    assert {panel["type"] for panel in panels(board)} <= {
        "row",
        "timeseries",
        "stat",
        "gauge",
        "table",
        "state-timeline",
    }
    for panel in query_panels(board):
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title


@pytest.mark.parametrize("query", panel_queries(dashboard()), ids=lambda query: query.name)
def test_panel_follows_the_variables(query: Query) -> None:
    expr = next(
        target["expr"]
        for panel in query_panels(dashboard())
        for target in panel["targets"]
        if query.name == f'panel "{panel["title"]}" {target["refId"]}'
    )
    matchers = MATCHER.findall(expr)
    # No hard-coded instance, listener or target: only the variables.
    assert all(value == f"${label}" and op == "=~" for label, op, value in matchers), matchers
    assert ("instance", "=~", "$instance") in matchers
    if re.search(r"forkproxy[_:]target_", expr):
        assert {("listener", "=~", "$listener"), ("target", "=~", "$target")} <= set(matchers)
    if re.search(r"forkproxy[_:]listener_", expr):
        assert ("listener", "=~", "$listener") in matchers
    # Rates come from the recording rules, each of which exists.
    assert not re.search(r"\b(rate|irate|increase)\(", expr), "use a recording rule"
    records = {rule["record"] for rule in recording_rules()}
    assert set(RECORDED.findall(expr)) <= records


def test_every_query_is_listed_for_the_live_test() -> None:
    queries = all_queries()
    names = [query.name for query in queries]
    assert len(names) == len(set(names))
    board = dashboard()
    targets = sum(len(panel["targets"]) for panel in query_panels(board))
    assert len([name for name in names if name.startswith("panel ")]) == targets
    assert {f"record {rule['record']}" for rule in recording_rules()} <= set(names)
    assert {"variable instance", "variable listener", "variable target"} <= set(names)
    for query in queries:
        assert "$" not in query.expr, query


def test_every_query_parses(tmp_path: Path) -> None:
    # promtool has no expression checker of its own: each query becomes a recording
    # rule, which `promtool check rules` parses.
    queries = all_queries()
    checks = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"check:query_{index}:value", "expr": query.expr}
                    for index, query in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(checks))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
