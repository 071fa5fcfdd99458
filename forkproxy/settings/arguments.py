"""forkproxy's command line: argparse's definition of it, and argv to a `Config`.

The options and their spelling are systemd-socket-proxyd's (getopt_long: `--opt=value`
and `--opt value`, options after the target, unambiguous prefixes of its own options),
so a unit file's ExecStart= can switch programs and nothing else; forkproxy's other
options are never abbreviated. The relay options' part is in relay_arguments.py; the
values are read by option_values.py, and merged with a --config file's by assemble.py.
Raises `UsageError` for what the user got wrong; never prints (but for argparse's
--help and --version), never exits on an error, never touches sockets.
"""

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from forkproxy import __version__
from forkproxy.errors import UsageError
from forkproxy.settings.assemble import assemble_config
from forkproxy.settings.config import (
    DEFAULT_CONNECTIONS_MAX,
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_WORKER_TIMEOUT,
    MAX_WORKERS,
    Config,
)
from forkproxy.settings.configfile import read_config_text
from forkproxy.settings.quoting import quote
from forkproxy.settings.relay_arguments import (
    BARE_VALUES,
    OPTIONAL_VALUE_TERMS,
    add_relay_arguments,
    attach_optional_values,
)
from forkproxy.settings.timespan import format_timespan

_LONG_REPR = re.compile(r"'([^']{100,})'")
_USAGE = """forkproxy [OPTIONS...] HOST:PORT
       forkproxy [OPTIONS...] UNIX-DOMAIN-SOCKET-PATH
       forkproxy [OPTIONS...] TARGET TARGET...   (round-robin, skipping failed ones)
       forkproxy [--check] --config FILE [OPTIONS...] [TARGET...]"""
_DESCRIPTION = "Bidirectionally proxy local sockets to another (possibly remote) socket."
_EPILOG = f"""\
Sockets come from systemd (sd_listen_fds(3): LISTEN_FDS, LISTEN_FDNAMES) or, when none
are passed, from --listen. TIME is a systemd.time(7) span: "30", "500ms", "5min 20s",
"infinity". Connection limits count across all workers.

defaults: --connections-max={DEFAULT_CONNECTIONS_MAX}, --exit-idle-time=infinity,
--workers=<CPUs available>, --graceful-timeout={format_timespan(DEFAULT_GRACEFUL_TIMEOUT)},
--worker-timeout={format_timespan(DEFAULT_WORKER_TIMEOUT)}

Every option, the target and time syntax, signals and exit status: man forkproxy"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting with status 2."""

    version_text: "VersionText"  # --version's line

    def error(self, message: str) -> NoReturn:
        raise UsageError(_reword(message))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an optional value attached, as it must be given: --keepalive[=IDLE,...]."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        term = OPTIONAL_VALUE_TERMS.get(action.dest)
        return term if term is not None else super()._format_action_invocation(action)


def _reword(message: str) -> str:
    # argparse quotes values with repr() (escaped, but of any length): shorten them.
    message = _LONG_REPR.sub(lambda match: quote(match.group(1)), message)
    # argparse names options by all their spellings ("argument -c/--connections-max: ...");
    # one line naming the long option reads better.
    if message.startswith("argument "):
        spelled, _, reason = message[len("argument ") :].partition(": ")
        option = spelled.split("/")[-1]
        return f"option '{option}': {reason}"
    return message


VersionText = Callable[[], str]


def _plain_version() -> str:
    return f"forkproxy {__version__}"


class _VersionAction(argparse.Action):
    """--version: print the parser's `version_text()`, asked only when --version is given
    (the caller's text may need to look around: the engine a worker would run, say)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        assert isinstance(parser, _Parser)
        print(parser.version_text(), file=sys.stdout)
        parser.exit()


def _build_parser(version: VersionText = _plain_version) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forkproxy",
        usage=_USAGE,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument(
        "-c",
        "--connections-max",
        metavar="N",
        help="maximum number of simultaneous connections; more are refused",
    )
    parser.add_argument(
        "--exit-idle-time",
        metavar="TIME",
        help="exit when without a connection for this duration",
    )
    parser.add_argument(
        "-w", "--workers", metavar="N", help=f"number of worker processes (1-{MAX_WORKERS})"
    )
    parser.add_argument(
        "-l",
        "--listen",
        metavar="[NAME=]ADDR",
        action="append",
        default=[],
        help="listen on ADDR (PORT, IPV4:PORT, [IPV6]:PORT, /path, @name) when no sockets "
        "are passed; repeatable",
    )
    parser.add_argument(
        "--socket-mode",
        metavar="MODE",
        help="file mode of unix sockets created by --listen and --metrics (octal, default 0666)",
    )
    parser.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics and a health check at http://ADDR/metrics and "
        "/healthz (IPV4:PORT, [IPV6]:PORT, /path, @name; keep it on loopback); a passed "
        "socket named 'metrics' is used instead",
    )
    parser.add_argument(
        "--graceful-timeout",
        metavar="TIME",
        help="on stop, how long open connections may take to finish",
    )
    parser.add_argument(
        "--worker-timeout",
        metavar="TIME",
        help="replace a worker whose event loop has not run for this long",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="least important messages to log: debug, info, warning or error (default info)",
    )
    parser.add_argument(
        "--inetd",
        action="store_true",
        help="relay the one connection on standard input (StandardInput=socket), then exit",
    )
    add_relay_arguments(parser)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from the TOML file FILE (see CONFIGURATION FILE in "
        "forkproxy(8)); options given here override its top level",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the settings (and the --config file), resolve the targets, print "
        "each listener's route and exit: 0 if all is well, 2 with every error if not",
    )
    parser.version_text = version
    parser.add_argument(
        "--version", action=_VersionAction, help="show the version and the relay engine, and exit"
    )
    return parser


def parse_args(argv: list[str], version: VersionText = _plain_version) -> Config:
    """Turn argv (without the program name), and the --config file it names, into a
    Config; raise UsageError if bad (`UsageErrors` with every one, if several). `version`
    gives --version's line."""
    return load_settings(argv, version=version)[0]


def load_settings(
    argv: list[str], config_text: str | None = None, version: VersionText = _plain_version
) -> tuple[Config, str | None]:
    """`parse_args`, and the text of the --config file as it was read (None without one).

    With `config_text`, that is the file's text and the file is not read (a reload's
    fallback to the settings it ran with: the file may have changed since)."""
    parser = _build_parser(version)
    args, unknown = parser.parse_known_intermixed_args(attach_optional_values(argv, parser))
    if unknown:
        shown = [arg if arg.isprintable() and len(arg) <= 40 else quote(arg) for arg in unknown]
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        raise UsageError(f"unrecognized arguments: {' '.join(shown[:3])}{more}")
    if args.config is not None and config_text is None:
        config_text = read_config_text(args.config)
    if args.config is None:
        config_text = None
    return assemble_config(args, parser, BARE_VALUES, config_text), config_text


def wants_check(argv: list[str]) -> bool:
    """Whether argv asks for --check: known even when the rest of it is wrong."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--check" in options
