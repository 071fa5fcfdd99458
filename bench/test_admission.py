"""Micro-benchmark of admission from Python: one admit and its release, in one process.

Run with `.venv/bin/pytest bench/test_admission.py --benchmark-only`. The mapping is set
up as the master does it, with two slots counting towards the cap (a worker and its
replacement, say). Per round: ADMISSIONS admits and releases of the global cap alone, or
with a per-source limit (each client a new source, its row claimed and freed, or one
source all along). Measures and never asserts speed; checks each admission was admitted.
"""

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from forkproxy.shared.admission import ADMITTED
from tests.support.shared_memory import make_shared

ADMISSIONS = 10_000
ROUNDS = 10


@pytest.mark.parametrize("per_source", ["off", "one source", "new sources"])
def test_admit_and_release(benchmark: BenchmarkFixture, per_source: str) -> None:
    shared = make_shared(256, per_source=0 if per_source == "off" else 4)
    admitter = shared.admission.admitter(1)
    one = bytes(10) + b"\xff\xff\x7f\x00\x00\x01"
    keys = [
        None if per_source == "off" else one if per_source == "one source" else
        bytes(10) + b"\xff\xff\x0a" + index.to_bytes(3, "big")
        for index in range(ADMISSIONS)
    ]  # fmt: skip

    def run_round() -> None:
        admit, release = admitter.admit, admitter.release
        for key in keys:
            token = admit(key)
            assert token >= ADMITTED
            release(token)

    benchmark.group = f"admission, {ADMISSIONS} admit+release a round"
    try:
        benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=1)
    finally:
        shared.close()
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["median_us_per_admission"] = (
            benchmark.stats.stats.median / ADMISSIONS * 1e6
        )
