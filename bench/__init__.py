"""The benchmark suite: `python -m bench` (or `make bench`); `bench.smoke.run_smoke` for the tests."""
