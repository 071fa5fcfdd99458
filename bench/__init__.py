"""Load scripts and recorded results for forkproxy; never imported by the package.

`python -m bench.compare` is the side-by-side runner (docs/bench.md). Measures, never asserts.
"""
