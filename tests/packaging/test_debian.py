"""debian/: the package's version is forkproxy's, and what it installs is there to install."""

import re

from forkproxy import __version__
from tests.support.proxy import REPO

DEBIAN = REPO / "debian"


def changelog_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"forkproxy \(([^)]+)\) \S+; urgency=\w+", first)
    assert match, f"unexpected first line of debian/changelog: {first!r}"
    return match.group(1)


def test_changelog_version_is_forkproxy_version() -> None:
    # [EPOCH:]UPSTREAM[-REVISION]: the upstream part is forkproxy.__version__.
    version = changelog_version()
    upstream = version.split(":", 1)[-1]
    if "-" in upstream:
        upstream = upstream.rsplit("-", 1)[0]
    assert upstream == __version__, (
        f"debian/changelog says {version}, forkproxy/__init__.py says {__version__}: "
        "add a debian/changelog entry (dch -v) when the version changes"
    )


def test_native_package_has_no_debian_revision() -> None:
    native = (DEBIAN / "source/format").read_text().strip() == "3.0 (native)"
    assert not native or "-" not in changelog_version()


def test_depends_on_debian_python_packages() -> None:
    control = (DEBIAN / "control").read_text()
    for package in ("python3-uvloop", "python3-prometheus-client", "python3-setproctitle"):
        assert re.search(rf"^Depends:(.|\n )*\b{package}\b", control, re.M), package


def test_every_man_page_is_installed() -> None:
    sources = sorted(path.name.removesuffix(".scd") for path in (REPO / "man").glob("*.scd"))
    assert sources
    installed = (DEBIAN / "forkproxy.manpages").read_text().split()
    assert sorted(installed) == [f"man/{page}" for page in sources]


def test_examples_are_the_shipped_units_and_configuration_file() -> None:
    shipped = (DEBIAN / "forkproxy.examples").read_text().split()
    assert shipped == ["systemd/*", "examples/forkproxy.toml"]
    assert list((REPO / "systemd").glob("*.service"))
    assert (REPO / "examples/forkproxy.toml").is_file()


def test_rules_and_dashboard_are_installed_under_usr_share() -> None:
    # dh_install lines: SOURCE DESTINATION-DIRECTORY
    lines = [line.split() for line in (DEBIAN / "forkproxy.install").read_text().splitlines()]
    installed = {source: destination for source, destination in lines}
    shipped = sorted(
        str(path.relative_to(REPO))
        for pattern in ("contrib/prometheus/*.yml", "contrib/grafana/*.json")
        for path in REPO.glob(pattern)
    )
    assert sorted(installed) == shipped
    for source, destination in installed.items():
        kind = "grafana" if source.endswith(".json") else "prometheus"
        assert destination == f"usr/share/forkproxy/{kind}", source
