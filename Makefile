# textgen: `make run` serves the embedded model, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-dev system run test lint pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python requirements.txt pyproject.toml deploy/install.sh
	deploy/install.sh $(BIN)/python
	touch $@

$(VENV)/.dev: $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml deploy/install.sh tests/js/package-lock.json
	deploy/install.sh $(BIN)/python --dev
	# axe-core, which the playground's tests inject into the page (from the npm registry).
	npm ci --prefix tests/js --no-audit --no-fund --silent
	touch $@ $(VENV)/.runtime

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

## The Debian packages the tests use for real (chromium, redis-server, postgresql, nginx, g++).
system:
	deploy/system.sh

## Serve the configured models (default: the embedded SmolLM2) with gunicorn on TEXTGEN_BIND.
run: setup
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## Lint, type-check and run the whole test suite (slow tests included).
test: lint pytest

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: setup-dev system
	$(BIN)/python -m pytest

bench: setup-dev
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/prefix.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The container image built and run for real with podman (installs podman, builds the image).
.PHONY: container-test
container-test:
	deploy/container/test.sh
