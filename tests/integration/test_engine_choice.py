"""Which relay engine runs: --version says it, FORKPROXY_ENGINE chooses it, and settings
the compiled engine does not support are relayed with Python, said once."""

import socket
from pathlib import Path

import pytest

from tests.support.proxy import run_cli, run_proxy, wait_until


def test_version_names_the_engine(relay_engine: str) -> None:
    result = run_cli(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"(engine: {relay_engine})\n")


def test_an_unknown_engine_is_a_one_line_error() -> None:
    result = run_cli(["127.0.0.1:9"], env={"FORKPROXY_ENGINE": "java"})
    assert result.returncode == 1
    assert result.stderr == "forkproxy: FORKPROXY_ENGINE must be c or python, got 'java'\n"


@pytest.mark.engines("c")
def test_what_the_compiled_engine_lacks_is_relayed_with_python_said_once(
    workdir: Path,
) -> None:
    env = {"FORKPROXY_FAILPOINT": "accept:1000"}  # hooks into the Python engine's callbacks
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        with run_proxy(["-w", "2", f"127.0.0.1:{port}"], workdir, env=env) as proxy:
            with proxy.connect() as client:
                target.settimeout(10)
                connection, _ = target.accept()
                with connection:
                    client.sendall(b"ping")
                    assert connection.recv(4) == b"ping"
            line = "the compiled engine does not support FORKPROXY_FAILPOINT=accept: relaying "
            wait_until(lambda: line in proxy.stderr(), 10, "the fallback line")
            assert proxy.stderr().count(line) == 1
