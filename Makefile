# The benchmark suite (bench/README.md). Extra options: make bench ARGS="--rates 100,500 --processes 4"
PYTHON ?= .venv/bin/python
ARGS ?=

.PHONY: bench bench-quick bench-smoke

bench:  ## the full suite with default knobs: about 18 minutes on 2 cores
	$(PYTHON) -m bench $(ARGS)

bench-quick:  ## about 3 minutes
	$(PYTHON) -m bench --quick $(ARGS)

bench-smoke:  ## seconds: what the test suite runs
	$(PYTHON) -m bench --smoke $(ARGS)
