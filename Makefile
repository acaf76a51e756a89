# The habits: `make run` (set up, train and evaluate the default G2P model),
# `make test` (set up, run the whole suite), `make check` (lint and format check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test check format clean

$(BIN)/genrnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the build at hand, so the range below never pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" || $(BIN)/pip install --quiet "torch>=2.2,<3"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/genrnn

run: setup
	$(BIN)/genrnn train --output runs/g2p-en $(TRAIN_ARGS)
	$(BIN)/genrnn evaluate --model runs/g2p-en/bundle --data builtin:cmudict:test --output runs/g2p-en/test-scores.json

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
