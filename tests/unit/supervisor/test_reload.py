"""How a reload runs forkproxy again: as it was started."""

import sys

import pytest

from forkproxy.shared.layout import LAYOUT_VERSION
from forkproxy.supervisor.reexec_state import STATE_FORMAT, check_marker
from forkproxy.supervisor.reload import judge_check, reexec_command


@pytest.mark.parametrize(
    ("original", "argv", "expected"),
    [
        # A console script: its interpreter, then the script.
        (["/venv/bin/python", "/venv/bin/forkproxy", "-w", "2", "h:1"], ["-w", "2", "h:1"],
         ["/venv/bin/python", "/venv/bin/forkproxy"]),
        # python -m forkproxy, with interpreter options.
        (["python3", "-X", "dev", "-m", "forkproxy", "h:1"], ["h:1"],
         ["python3", "-X", "dev", "-m", "forkproxy"]),
        # A launcher script run by `python -I`.
        (["/usr/bin/python3", "-I", "/usr/local/bin/forkproxy", "h:1"], ["h:1"],
         ["/usr/bin/python3", "-I", "/usr/local/bin/forkproxy"]),
    ],
)  # fmt: skip
def test_the_command_it_was_started_with(
    monkeypatch: pytest.MonkeyPatch, original: list[str], argv: list[str], expected: list[str]
) -> None:
    monkeypatch.setattr(sys, "orig_argv", original)
    assert reexec_command(argv) == (expected, argv)


def test_called_with_other_arguments_it_runs_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main(argv) called from Python with argv of its own (a test, say)."""
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest", "-q"])
    assert reexec_command(["h:1"]) == ([sys.executable, "-m", "forkproxy"], ["h:1"])


CANNOT_TAKE_OVER = "restart needed: the installed forkproxy cannot take over from this one"
BAD_KEY = "/etc/f.toml:3: unknown key 'tagets'"


def _marker(layout: int = LAYOUT_VERSION, state: int = STATE_FORMAT) -> str:
    return check_marker("9.9", layout, "python").replace(f"state={STATE_FORMAT}", f"state={state}")


@pytest.mark.parametrize(
    ("status", "text", "errors"),
    [
        (0x200, f"forkproxy: {BAD_KEY}\n", [BAD_KEY]),
        (0x200, "", ["the check exited with status 2"]),
        (0, "'web' -> 127.0.0.1:80\n", [CANNOT_TAKE_OVER]),
        (0, _marker(state=STATE_FORMAT + 1), [CANNOT_TAKE_OVER]),
        (0, _marker(layout=LAYOUT_VERSION + 1), [
            f"restart needed: shared memory layout changed (this one's is {LAYOUT_VERSION}, "
            f"forkproxy 9.9's {LAYOUT_VERSION + 1})"
        ]),
    ],
)  # fmt: skip
def test_a_check_that_refuses_the_reload(status: int, text: str, errors: list[str]) -> None:
    marker, _, why = judge_check(status, text)
    assert marker is None and why == errors


def test_a_check_that_passes() -> None:
    marker, reports, errors = judge_check(0, f"'web' -> 127.0.0.1:80\n{_marker()}\n")
    assert marker is not None and marker["version"] == "9.9" and marker["engine"] == "python"
    assert reports == ["'web' -> 127.0.0.1:80"] and errors == []
