"""No command line makes forkproxy-units print a traceback: a wrong one gets one line on
stderr and exit status 1; checked in-process for many, and with the installed command
for a sample. --output-dir is left out: a fuzzed command line must not write files."""

import contextlib
import io
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkproxy.units import run
from tests.support.proxy import FORKPROXY

FORKPROXY_UNITS = str(Path(FORKPROXY).with_name("forkproxy-units"))

FLAGS = [
    "--unit", "--listen-stream", "--listen-unix", "--socket-user", "--socket-group",
    "--socket-mode", "--backlog", "--accept", "--max-connections", "--metrics",
    "--target-unit", "--upstream-unit", "--share-namespace", "--description", "--executable",
    "--user", "--force", "-h", "--help", "--version", "--", "-",
]  # fmt: skip
FORKPROXY_OPTIONS = [
    "-c", "-w", "-l", "-p", "-pv2", "--connections-max", "--workers", "--listen", "--inetd",
    "--inet", "--exit-idle-time", "--graceful-timeout", "--worker-timeout", "--on-limit",
    "--connections-max-per-source", "--max-connections-per-source", "--route", "--keepalive",
    "--proxy-protocol", "--pipe-size", "--nodelay", "--no-nodelay", "--log-level",
    "--socket-mode", "--conn",
]  # fmt: skip
VALUES = [
    "web", "80", "0", "-1", "65536", "127.0.0.1:80", "[::1]:80", "[fe80::1%lo]:80",
    "[fe80::1]:80%lo", "[::]:80", "0.0.0.0:80", "/run/x", "@x", "/", "@", "vsock:1:2",
    "host.example:443", "nginx.service", "a=b", "admin=/run/y", "metrics=/m", "5min",
    "infinity", "1ms", "v1", "v3", "queue", "0660", "999", "www-data", "/usr/bin/forkproxy",
    "", " ", "%", "%n", "$HOME", "\\", "'", '"', "é", "\udcff", "\t", "\n", "x" * 300,
    "9" * 5000, "1" + "0" * 20,
]  # fmt: skip
WORD = st.one_of(
    st.sampled_from(FLAGS + FORKPROXY_OPTIONS + VALUES),
    st.builds("{}={}".format, st.sampled_from(FLAGS + FORKPROXY_OPTIONS), st.sampled_from(VALUES)),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=10),
).filter(lambda word: not word.startswith("--output-dir"))
ARGV = st.lists(WORD, max_size=10)


def check_outcome(status: int, out: str, err: str) -> None:
    assert "Traceback" not in err
    assert status in (0, 1), (status, err)
    if status == 1:
        assert out == ""
        assert err.startswith("forkproxy-units: ") and err.count("\n") == 1, err
    else:
        assert err == ""


def check_in_process(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run(argv)
    check_outcome(status, out.getvalue(), err.getvalue())


@settings(max_examples=600, deadline=None)
@given(ARGV)
def test_any_command_line_ends_in_one_line_or_units(argv: list[str]) -> None:
    check_in_process(argv)


# Whole command lines built to get past the first checks, so the sample goes deep.
GENERATOR_FLAGS = [
    "--listen-stream=80", "--listen-stream=[fe80::1%lo]:80", "--accept",
    "--metrics=127.0.0.1:9100", "--metrics=9100", "--listen-unix=/run/a",
    "--backlog=" + "9" * 5000, "--user", "--unit=web",
]  # fmt: skip
DEEP_ARGV = st.builds(
    lambda name, flags, target, options: [name, *flags, "--", target, *options],
    st.sampled_from(["web", "a-b", "x" * 250]),
    st.lists(st.sampled_from(GENERATOR_FLAGS), max_size=4),
    st.sampled_from(VALUES),
    st.lists(st.sampled_from(FORKPROXY_OPTIONS + VALUES), max_size=5),
)


@settings(max_examples=600, deadline=None)
@given(DEEP_ARGV)
def test_any_forkproxy_options_end_in_one_line_or_units(argv: list[str]) -> None:
    check_in_process(argv)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ARGV, DEEP_ARGV))
def test_the_installed_command_never_shows_a_traceback(argv: list[str]) -> None:
    done = subprocess.run(
        [FORKPROXY_UNITS, *argv], capture_output=True, text=True, timeout=60, check=False
    )
    check_outcome(done.returncode, done.stdout, done.stderr)
