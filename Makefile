# gpuhub: `make demo` starts a real JupyterHub with gpuhub on this machine; `make test` runs every
# test. Both install what they need first (Debian packages, Node programs, Python environments),
# once: re-running skips what is already there.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: all install install-system install-node install-python demo test test-fast lint format clean

all: install

install: install-system install-node install-python

install-system:
	bash scripts/install-system.sh

install-node: install-system
	bash scripts/install-node.sh

install-python: install-system
	PYTHON=$(PYTHON) bash scripts/install-python.sh

demo: install
	$(VENV)/bin/gpuhub demo

# Test workers (pytest-xdist): most slow tests wait on hubs, servers and kernels, so two run side
# by side even on two cores; a test file stays on one worker (its hub is shared by its tests).
# TEST_WORKERS=0 runs every test in one process.
TEST_WORKERS ?= 2

test: install
	$(VENV)/bin/pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The fast layers only (no real hub, no browser).
test-fast: install-python
	$(VENV)/bin/pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

lint: install-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-python
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .envs node_modules .demo .pytest_cache
