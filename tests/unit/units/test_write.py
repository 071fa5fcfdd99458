"""forkproxy-units --output-dir: never through a planted symlink, all files or none, and
errors that name the file the user asked for."""

import os
from pathlib import Path

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.units import run
from forkproxy.units import write as write_module
from forkproxy.units.write import write_units

FILES = {"web.socket": "[Socket]\n", "web.service": "[Service]\n"}
ARGV = ["web", "--listen-stream", "80", "127.0.0.1:80"]


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("planted", ["web.service.tmp", "web.socket.tmp", ".web.service.tmp"])
def test_planted_symlink_is_not_followed(tmp_path: Path, planted: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    (out / planted).symlink_to(victim)
    assert run(["--output-dir", str(out), *ARGV]) == 0
    assert victim.read_text() == "precious\n"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert entries(out) == sorted([planted, "web.service", "web.socket"])
    for name in ("web.service", "web.socket"):
        assert not (out / name).is_symlink()
        assert (out / name).stat().st_mode & 0o777 == 0o644


def test_force_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "web.service").symlink_to(victim)
    write_units(FILES, str(tmp_path), force=True)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "web.service").is_symlink()
    assert (tmp_path / "web.service").read_text() == "[Service]\n"


def test_a_directory_in_the_way_writes_nothing_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "web.service").mkdir()
    assert run(["--force", "--output-dir", str(tmp_path), *ARGV]) == 1
    assert capsys.readouterr().err == (
        f"forkproxy-units: cannot replace '{tmp_path / 'web.service'}': not a file "
        "(--force replaces files only)\n"
    )
    assert entries(tmp_path) == ["web.service"]  # no web.socket, nothing temporary
    assert run(["--output-dir", str(tmp_path), *ARGV]) == 1
    assert capsys.readouterr().err == (
        f"forkproxy-units: '{tmp_path / 'web.service'}' exists: remove it or pass --force\n"
    )
    assert entries(tmp_path) == ["web.service"]


def test_force_replaces_old_files(tmp_path: Path) -> None:
    (tmp_path / "web.socket").write_text("old\n")
    (tmp_path / "web.socket").chmod(0o600)
    write_units(FILES, str(tmp_path), force=True)
    assert (tmp_path / "web.socket").read_text() == "[Socket]\n"
    assert (tmp_path / "web.socket").stat().st_mode & 0o777 == 0o644
    assert entries(tmp_path) == ["web.service", "web.socket"]


def test_a_file_that_appears_meanwhile_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --force, link(2) puts each file in place, so one that appeared since the
    check stays, and the files already placed are taken back: all or none."""
    link = os.link

    def late_arrival(source: str, destination: str, **kwargs: bool) -> None:
        if destination.endswith("web.service"):
            Path(destination).write_text("someone else's\n")
        link(source, destination, **kwargs)

    monkeypatch.setattr(write_module.os, "link", late_arrival)
    with pytest.raises(ForkproxyError) as raised:
        write_units(FILES, str(tmp_path), force=False)
    assert str(raised.value) == f"'{tmp_path / 'web.service'}' exists: remove it or pass --force"
    assert entries(tmp_path) == ["web.service"]
    assert (tmp_path / "web.service").read_text() == "someone else's\n"


def test_errors_name_the_unit_file_not_a_temporary_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /proc/self is a directory in which nothing can be created.
    assert run(["--output-dir", "/proc/self", *ARGV]) == 1
    assert capsys.readouterr().err == (
        "forkproxy-units: cannot write '/proc/self/web.socket': No such file or directory\n"
    )


def test_missing_directories_are_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    assert write_units(FILES, str(out), force=False) == [
        str(out / "web.socket"),
        str(out / "web.service"),
    ]
    assert entries(out) == ["web.service", "web.socket"]


def test_a_file_in_the_directory_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ForkproxyError) as raised:
        write_units(FILES, str(tmp_path / "file" / "units"), force=False)
    assert str(raised.value) == (
        f"cannot create directory '{tmp_path / 'file' / 'units'}': Not a directory"
    )
