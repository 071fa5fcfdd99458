"""The README's two opening commands: what they promise stays true to .ci/run."""

import re

from tests.support.proxy import REPO


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)\n```$", text, re.MULTILINE | re.DOTALL)


def test_the_readme_opens_with_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    opening = readme.split("\n---\n", 1)[0]
    assert len(_shell_blocks(opening)) == 2
    assert all("\n" not in block for block in _shell_blocks(opening))


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """Each step of the README's second command is a line of .ci/run, in the same order
    (CI runs more after them: the linters and the Debian package)."""
    readme = (REPO / "README.md").read_text()
    steps = _shell_blocks(readme)[1].split(" && ")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    positions = [ci_lines.index(step) for step in steps]
    assert positions == sorted(positions), (steps, ci_lines)
