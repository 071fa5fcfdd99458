"""No command line makes the real forkproxy print a traceback: a wrong one gets
one line on stderr and exit status 1, from the installed command, imports and all."""

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from forkproxy.errors import ForkproxyError
from forkproxy.settings.arguments import _build_parser, parse_args
from tests.support.proxy import run_cli

# --check exits 2 on an error (tests/integration/test_config_file.py checks it).
OPTIONS = sorted(
    option
    for action in _build_parser()._actions
    for option in action.option_strings
    if option not in ("-h", "--help", "--version", "--check")
)
WORDS = st.one_of(
    st.sampled_from(OPTIONS),
    st.sampled_from(["0", "-1", "5min", "x", "", "v3", "h:1", "[::1]", "/p", "@", "1,2"]),
    st.text(st.characters(codec="utf-8", blacklist_characters="\0\r\n"), max_size=8),
)


def fails_at_once(argv: list[str]) -> bool:
    """Refused by the parser, or nothing to listen on (the harness passes no sockets)."""
    try:
        config = parse_args(argv)
    except ForkproxyError:
        return True
    return not config.listen


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(WORDS, min_size=1, max_size=6))
def test_a_wrong_command_line_is_one_line_and_status_1(argv: list[str]) -> None:
    assume(fails_at_once(argv))  # a right one would start serving
    result = run_cli(argv)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("forkproxy: ") and result.stderr.count("\n") == 1, result
    assert result.stdout == ""
