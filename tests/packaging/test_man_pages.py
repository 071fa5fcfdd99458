"""The manual pages in man/: every option of the real commands documented, clean rendering.

The pages are scdoc(5) sources; `make -C man` renders them (as the Debian package build
does). An option added to `forkproxy --help` or `forkproxy-units --help` without a term
line in its page fails here, and so does a page documenting an option the command lacks.
"""

import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy import FORKPROXY, REPO

MAN = REPO / "man"
FORKPROXY_UNITS = str(Path(FORKPROXY).with_name("forkproxy-units"))
PAGES = {"forkproxy.8": FORKPROXY, "forkproxy-units.1": FORKPROXY_UNITS}
# An option as written in help text and in the pages: -c, --connections-max, --no-nodelay.
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)")
# A help line that defines options: indented a little, starting with '-' (continuation
# lines of argparse's help are indented much further).
_HELP_TERM = re.compile(r"^ {1,4}(-.*)$")


def help_options(command: str) -> set[str]:
    """The options `command --help` defines (from its term column, not its prose)."""
    result = subprocess.run(
        [command, "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    options: set[str] = set()
    for line in result.stdout.splitlines():
        match = _HELP_TERM.match(line)
        if match:
            term = re.split(r"\s{2,}", match.group(1))[0]
            options.update(_OPTION.findall(term))
    return options


def page_options(source: Path) -> set[str]:
    """The options a page defines: its term lines, a bold '*-...' line right above the
    tab-indented paragraph that describes it."""
    options: set[str] = set()
    lines = source.read_text().splitlines()
    for line, following in itertools.pairwise(lines):
        if line.startswith("*-") and following.startswith("\t"):
            options.update(_OPTION.findall(line.replace("*", " ").replace("_", " ")))
    return options


def test_help_options_are_found() -> None:
    # The extraction itself: if it found nothing, the checks below would pass vacuously.
    assert {"-c", "--connections-max", "--nodelay", "--no-nodelay", "--version"} <= (
        help_options(FORKPROXY)
    )
    assert {"--listen-stream", "--output-dir", "-h", "--help"} <= help_options(FORKPROXY_UNITS)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_documents_every_option_of_its_command(page: str) -> None:
    missing = help_options(PAGES[page]) - page_options(MAN / f"{page}.scd")
    assert not missing, f"man/{page}.scd has no term line for {sorted(missing)}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_documents_no_option_its_command_lacks(page: str) -> None:
    stale = page_options(MAN / f"{page}.scd") - help_options(PAGES[page])
    assert not stale, f"man/{page}.scd documents {sorted(stale)}, unknown to --help"


def test_metric_names_in_the_page_exist() -> None:
    # Counters are exposed with _total, info metrics with _info; the code names them without.
    source = "\n".join(path.read_text() for path in (REPO / "forkproxy").rglob("*.py"))
    named = set(re.findall(r"forkproxy_[a-z_]+[a-z]", (MAN / "forkproxy.8.scd").read_text()))
    assert named
    unknown = {name for name in named if re.sub(r"_(total|info)$", "", name) not in source}
    assert not unknown, f"forkproxy.8 names metrics the code does not have: {sorted(unknown)}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages rendered by man/Makefile, in a copy of man/ (the checkout stays clean)."""
    for tool, package in (("scdoc", "scdoc"), ("groff", "groff-base"), ("man", "man-db")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (Debian package {package})")
    directory = tmp_path_factory.mktemp("man")
    for source in [*MAN.glob("*.scd"), MAN / "Makefile"]:  # not pages rendered earlier
        shutil.copy(source, directory)
    subprocess.run(["make", "-s", "-C", str(directory)], check=True, timeout=60)
    return directory


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_renders_without_warnings(rendered: Path, page: str) -> None:
    path = str(rendered / page)
    groff = subprocess.run(
        ["groff", "-ww", "-man", "-z", path], capture_output=True, text=True, timeout=60
    )
    assert (groff.returncode, groff.stderr) == (0, "")
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    man = subprocess.run(
        ["man", "--warnings", "-l", path], capture_output=True, text=True, timeout=60, env=env
    )
    assert (man.returncode, man.stderr) == (0, "")
    name = page.rsplit(".", 1)[0]
    assert man.stdout.startswith(f"{name}(")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n{section}\n" in man.stdout
    # No line ends in a hyphen, so no option is broken ("--on-" / "limit"): see man/Makefile.
    assert not re.search(r"-\n", man.stdout.replace("\u2010", "-"))


def test_forkproxy_page_covers_signals_environment_and_metrics(rendered: Path) -> None:
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    man = ["man", "-l", str(rendered / "forkproxy.8")]
    text = subprocess.run(
        man, capture_output=True, text=True, timeout=60, env=env, check=True
    ).stdout
    for heading in ("TARGET SYNTAX", "TIME SYNTAX", "SIGNALS", "ENVIRONMENT", "METRICS"):
        assert f"\n{heading}\n" in text
    for word in (
        *("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU"),
        *("LISTEN_FDS", "NOTIFY_SOCKET", "WATCHDOG_USEC"),
        *("systemd-socket-proxyd(8)", "systemd.socket(5)"),
    ):
        assert word in text
