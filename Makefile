# Developer shortcuts. Override the interpreter with `make bench PYTHON=/path/to/python`;
# by default a ./.venv is used when there is one, else python3 from PATH.
PYTHON ?= $(or $(wildcard .venv/bin/python),python3)

.PHONY: test bench bench-quick

test:
	$(PYTHON) -m pytest -q

# Every benchmark area on this machine; writes bench/results/<date>-<host>.{md,json}.
bench:
	$(PYTHON) -m bench

bench-quick:
	$(PYTHON) -m bench --quick
