# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: venv demo test lint bench
venv: $(BIN)/.installed

demo: venv
	$(BIN)/python examples/persistent_session.py

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check mqtt_persist tests examples $(wildcard benchmarks)
	$(BIN)/ruff format --check mqtt_persist tests examples $(wildcard benchmarks)
	$(BIN)/mypy

bench: venv
	$(BIN)/python benchmarks/publish_throughput.py
