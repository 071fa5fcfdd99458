"""How a reload runs forkproxy again: as it was started."""

import sys

import pytest

from forkproxy.supervisor.reload import reexec_command


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
