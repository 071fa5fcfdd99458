"""No command line makes the real forkproxy print a traceback: a wrong one gets one line
on stderr and exit status 1, from the installed command, imports and all.

The command lines are tests.support.argv's hostile ones (huge numbers, control
characters, bytes that are not UTF-8); the thorough search is the parser's own test
(tests/unit/settings/test_arguments.py), this one a sample through the real process.
None starts a proxy: those the parser accepts with a --listen address are skipped, and
the rest find no socket to serve (no $LISTEN_FDS, standard input /dev/null).
"""

from hypothesis import HealthCheck, assume, given, settings

from forkproxy.errors import ForkproxyError
from forkproxy.settings.arguments import parse_args
from tests.support.argv import ARGVS
from tests.support.proxy import run_cli

NO_SOCKETS = {"LISTEN_PID": "", "LISTEN_FDS": "", "LISTEN_FDNAMES": ""}


def fails_at_once(argv: list[str]) -> bool:
    """Refused by the parser, or nothing to listen on (no sockets are passed)."""
    try:
        config = parse_args(argv)
    except ForkproxyError:
        return True
    except SystemExit:  # --help, --version and their prefixes: they print and exit 0
        return False
    return not config.listen


@settings(
    max_examples=20,  # about 0.3-0.8 s each: the whole test stays well under 30 s
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(ARGVS)
def test_a_wrong_command_line_is_one_line_and_status_1(argv: list[str]) -> None:
    assume(fails_at_once(argv))  # a right one would start serving
    result = run_cli(argv, env=NO_SOCKETS, timeout=20)  # a timeout fails the example
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.split("\n")
    assert len(lines) == 2 and lines[1] == "", result.stderr  # one line, ended by a newline
    assert lines[0].startswith("forkproxy: ") and lines[0].isprintable(), result.stderr
    assert result.stdout == ""
