"""Shared fixtures: real backends and the real forkproxy command, on each relay engine."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests run the code from this checkout; the backends are started as `-m tests.support...`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest_plugins = ["tests.support.nginx", "tests.support.systemd_boot"]


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for unix sockets (sun_path is 108 bytes)."""
    directory = Path(f"/tmp/fp-{os.getpid()}-{tmp_path_factory.getbasetemp().name}")
    directory.mkdir(exist_ok=True)
    path = Path(tmp_path_factory.mktemp("w", numbered=True))
    short = directory / path.name
    short.mkdir()
    return short


# -- every integration test on each relay engine ---------------------------------------------

ENGINE_VARIABLE = "FORKPROXY_ENGINE"  # forkproxy/relay/engine.py
ENGINES = ("c", "python")
_INTEGRATION = Path(__file__).resolve().parent / "integration"


def _compiled_engine_built() -> bool:
    try:
        from forkproxy.relay import _engine  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engines",
        default=",".join(ENGINES),
        help="the relay engines to run the integration tests on, comma-separated "
        "(default: c,python)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "engines(*names): run this integration test on these relay engines only (c, python)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Integration tests run once per engine: [c] and [python] (`relay_engine`)."""
    if _INTEGRATION in metafunc.definition.path.parents:
        wanted = metafunc.config.getoption("--engines").split(",")
        engines = [engine for engine in ENGINES if engine in wanted]
        metafunc.parametrize("relay_engine", engines, indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `engines(...)` is not collected for the other engines."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("engines")
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("relay_engine") if callspec is not None else None
        if marker is not None and engine is not None and engine not in marker.args:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def relay_engine(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """FORKPROXY_ENGINE for the forkproxy processes a test starts (they inherit the
    environment); None outside tests/integration. The c variant skips without the
    compiled engine."""
    engine: str | None = getattr(request, "param", None)
    if engine is None:
        yield None
        return
    if engine == "c" and not _compiled_engine_built():
        pytest.skip("the compiled engine is not built")
    before = os.environ.get(ENGINE_VARIABLE)
    os.environ[ENGINE_VARIABLE] = engine
    try:
        yield engine
    finally:
        if before is None:
            os.environ.pop(ENGINE_VARIABLE, None)
        else:
            os.environ[ENGINE_VARIABLE] = before
