"""contrib/prometheus: the alerting and recording rules pass `promtool check rules`,
and their unit tests (`promtool test rules`, in contrib/prometheus/tests) pass and cover
every rule: each alert fires on trouble and stays quiet on a healthy series, each
recording rule records a known value."""

import re
import subprocess
from typing import Any

import yaml

from tests.support.monitoring import (
    ALERTS,
    RULE_TESTS,
    RULES,
    alerting_rules,
    promtool,
    recording_rules,
)

# level:metric:operations, the level being `forkproxy` (see forkproxy-rules.yml)
RECORD_NAME = re.compile(r"forkproxy:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*")


def rule_test_files() -> list[Any]:
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, f"no promtool unit tests in {RULE_TESTS}"
    return files


def rule_test_groups() -> list[dict[str, Any]]:
    return [
        group for path in rule_test_files() for group in yaml.safe_load(path.read_text())["tests"]
    ]


def test_promtool_check_rules_passes() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES), str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2, result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, rule_test_files())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(rule_test_files()), result.stdout


def test_every_alert_fires_on_trouble_and_stays_quiet_when_healthy() -> None:
    firing: dict[str, list[dict[str, Any]]] = {}
    quiet: set[str] = set()
    for group in rule_test_groups():
        instances = {
            match
            for series in group["input_series"]
            for match in re.findall(r'instance="([^"]+)"', series["series"])
        }
        for case in group.get("alert_rule_test", []):
            if case["exp_alerts"]:
                alerting = {alert["exp_labels"]["instance"] for alert in case["exp_alerts"]}
                # The healthy series sit beside the troubled ones and raise nothing.
                assert instances - alerting, f"{group['name']}: no healthy series beside"
                firing.setdefault(case["alertname"], []).extend(case["exp_alerts"])
            else:
                quiet.add(case["alertname"])
    names = [rule["alert"] for rule in alerting_rules()]
    assert sorted(firing) == sorted(names), "alerts without a firing case"
    assert sorted(quiet) == sorted(names), "alerts without a quiet case"
    for name, alerts in firing.items():
        for alert in alerts:
            assert set(alert["exp_annotations"]) == {"summary", "description"}, name


def test_every_recording_rule_records_a_tested_value() -> None:
    tested = {
        case["expr"]
        for group in rule_test_groups()
        for case in group.get("promql_expr_test", [])
        if case["exp_samples"]
    }
    untested = [rule["record"] for rule in recording_rules() if rule["record"] not in tested]
    assert not untested


def test_recording_rule_names_follow_the_convention() -> None:
    names = [rule["record"] for rule in recording_rules()]
    assert len(names) == len(set(names))
    for rule in recording_rules():
        name, expr = rule["record"], rule["expr"]
        assert RECORD_NAME.fullmatch(name), name
        _, metric, operations = name.split(":")
        assert not metric.endswith("_total"), name
        # The window the name promises is the window the expression uses.
        for function in ("rate", "increase"):
            windows = set(re.findall(rf"\b{function}\([^\[]*\[(\w+)\]", expr))
            if windows:
                assert {f"{function}{window}" for window in windows} == {
                    part for part in operations.split("_") if part.startswith(function)
                }, name


def test_alerts_say_where_and_how_bad() -> None:
    for rule in alerting_rules():
        name, expr = rule["alert"], rule["expr"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        for text in annotations.values():
            assert "$labels.instance" in text, name
        mentions = annotations["summary"] + annotations["description"]
        if "forkproxy_target_" in expr or "forkproxy_listener_" in expr:
            assert "$labels.listener" in mentions, name
        if "forkproxy_target_" in expr and "without (target)" not in expr:
            assert "$labels.target" in mentions, name
