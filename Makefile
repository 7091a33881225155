# topoflow: `make run` runs the pipeline on the embedded default, `make test` the test suite.
# Both install what they need first (a Python 3.11 virtual environment in .venv).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	@touch $@

# Java for Spark, the XRootD server for the storage tests: Debian packages, installed when root.
system-deps:
	@if command -v java >/dev/null && command -v xrootd >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			default-jre-headless xrootd-server >/dev/null; \
	else echo "note: not root: install Java 17 and xrootd-server yourself (XRootD tests will be skipped)"; fi

run: install system-deps
	$(BIN)/topoflow generate --config configs/default.yaml
	$(BIN)/topoflow ingest --config configs/default.yaml
	$(BIN)/topoflow prepare --config configs/default.yaml
	$(BIN)/topoflow train --config configs/default.yaml --model hlf --restart --no-progress
	$(BIN)/topoflow train --config configs/default.yaml --model gru --restart --no-progress
	$(BIN)/topoflow train --config configs/default.yaml --model inclusive --restart --no-progress
	$(BIN)/topoflow evaluate --config configs/default.yaml

test: install system-deps
	$(BIN)/python -m pytest

bench: install system-deps
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/ingest_throughput.py
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/training_throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
