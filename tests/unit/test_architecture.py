"""ARCHITECTURE.md stays true to the tree: every path it names exists, and it names every
sub-package."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "forkproxy"
TEXT = (ROOT / "ARCHITECTURE.md").read_text()


def test_every_path_it_names_exists() -> None:
    named = set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+(?:\.py|/))(?![\w/])", TEXT))
    assert any(name.startswith("forkproxy/") for name in named)
    missing = []
    for name in sorted(named):
        if "/" in name.rstrip("/"):
            found = (ROOT / name).exists() or (PACKAGE / name).exists()
        else:  # a bare file or folder name, as in the table's rows
            found = any(PACKAGE.rglob(name.rstrip("/"))) or (ROOT / name).exists()
        if not found:
            missing.append(name)
    assert not missing, f"ARCHITECTURE.md names what does not exist: {missing}"


def test_it_names_every_sub_package() -> None:
    packages = sorted(
        init.parent.relative_to(ROOT).as_posix() + "/"
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE
    )
    assert packages
    unnamed = [package for package in packages if package not in TEXT]
    assert not unnamed, f"ARCHITECTURE.md does not name {unnamed}"


# A module a reader can hold in mind, a class with one responsibility: the limits the
# layout promises (ARCHITECTURE.md), checked so that growth splits code along its seams.
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300


def test_no_module_or_class_outgrows_the_limits() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{name}: class {node.name}, {length} lines")
    assert not too_long, too_long
