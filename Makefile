# lrreid: the two commands a user needs are `make run` and `make test`.
# Both create .venv with the exact versions in requirements.lock first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
UV_VERSION := 0.13.9
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test install lock bench clean-data

run: install            ## set up, materialise data/raw, run the whole DVC pipeline
	$(BIN)/lrreid synthesize
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install           ## set up and run the test suite (what .ci/run calls)
	@# PYTHONFAULTHANDLER: a crash, even at interpreter exit, prints every thread's Python stack
	PATH="$(CURDIR)/$(BIN):$$PATH" PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

lock:                   ## re-pin requirements.lock from requirements.in
	$(UV) pip compile requirements.in --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 -o requirements.lock

bench: install          ## run the benchmarks (results go to BENCHMARKS.md by hand)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_repro_noop.py
