"""How many empty pipes a worker keeps: bounded in count and in pipe capacity."""

import pytest

from forkproxy.shared.protocol import PIPE_POOL_BYTES, PIPE_POOL_KEEP, pipe_pool_keep


@pytest.mark.parametrize(
    ("pipe_size", "keep"),
    [(4096, PIPE_POOL_KEEP), (64 << 10, 64), (256 << 10, 16), (1 << 20, 4), (1 << 30, 4)],
)
def test_pool_keeps_at_most_its_byte_budget(pipe_size: int, keep: int) -> None:
    assert pipe_pool_keep(pipe_size) == keep
    # Never more capacity than the budget, except the floor of 4 for huge pipes.
    assert keep * pipe_size <= PIPE_POOL_BYTES or keep == 4
