"""Other versions of forkproxy, installed with pip into a venv of the test's own.

`build_wheels` copies this checkout with another `__version__` (and, if asked, a change
to its code), and builds a wheel of each with `pip wheel`, all at once: with the compiled
engine when the test runs it (FORKPROXY_ENGINE=c: the new image's workers need it, as an
upgrade of such an installation brings it), else pure Python (FORKPROXY_NO_EXTENSION=1). `Venv` is a
venv without pip that sees this checkout's venv for forkproxy's dependencies (a .pth
file) but not forkproxy itself, and `install` puts a wheel into it with this venv's pip,
as an upgrade would: over the files of the running version.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.proxy import REPO

_SOURCES = ("forkproxy", "csrc", "setup.py", "pyproject.toml", "README.md")
_PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@dataclass(frozen=True)
class Version:
    """A copy of this checkout as version `version`; `patch` changes its tree."""

    version: str
    patch: Callable[[Path], None] | None = None


def build_wheels(directory: Path, versions: list[Version]) -> dict[str, Path]:
    """A wheel for each version, by version."""
    builds = []
    for version in versions:
        source = directory / f"source-{version.version}"
        for name in _SOURCES:
            if (REPO / name).is_dir():
                shutil.copytree(
                    REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so")
                )
            else:
                shutil.copy(REPO / name, source / name)
        init = source / "forkproxy" / "__init__.py"
        init.write_text(
            "\n".join(
                f'__version__ = "{version.version}"' if line.startswith("__version__") else line
                for line in init.read_text().splitlines()
            )
            + "\n"
        )
        if version.patch is not None:
            version.patch(source)
        out = directory / f"wheel-{version.version}"
        builds.append(
            (
                version.version,
                out,
                subprocess.Popen(
                    [*_PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
                    env=_build_environment(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    wheels = {}
    for version, out, process in builds:
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            raise RuntimeError(f"pip wheel of version {version} failed:\n{output}")
        (wheel,) = out.glob("forkproxy-*.whl")
        wheels[version] = wheel
    return wheels


class Venv:
    """A venv of the test's own that runs forkproxy as installed into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
        # The dependencies: this checkout's venv, after the venv's own site-packages.
        (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def forkproxy(self) -> str:
        return str(self.path / "bin" / "forkproxy")

    def install(self, wheel: Path) -> None:
        subprocess.run(
            [*_PIP, "--python", self.python, "install", "--quiet", "--no-deps", "--no-index"]
            + ["--force-reinstall", str(wheel)],
            check=True,
            capture_output=True,
            timeout=120,
        )


def _build_environment() -> dict[str, str]:
    """pip's environment: the compiled engine built only for a test that runs it."""
    if os.environ.get("FORKPROXY_ENGINE") == "c":
        return {key: value for key, value in os.environ.items() if key != "FORKPROXY_NO_EXTENSION"}
    return {**os.environ, "FORKPROXY_NO_EXTENSION": "1"}
