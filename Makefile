# The habits: `make run` (set up, train the quickstart G2P model if no bundle is there yet,
# serve it), `make test` (set up, run the whole suite), `make check` (lint and format check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# What `make run` trains (only when BUNDLE is missing) and serves: G2P sized for a CPU, at most
# GENRNN_TRAIN_TIME (DD:HH:MM:SS) of training. The full model on a GPU:
#   make run TRAIN_CONFIG=training/configs/g2p.yaml RUN_DIR=runs/g2p-en
TRAIN_CONFIG ?= training/configs/g2p-small.yaml
RUN_DIR ?= runs/g2p-en-small
BUNDLE ?= $(RUN_DIR)/bundle
GENRNN_TRAIN_TIME ?= 00:00:09:00
# Where `make run` / `make serve` listen; every other GENRNN_* setting of docker/entrypoint.sh
# is read from the environment as in the container.
GENRNN_HOST ?= 127.0.0.1
GENRNN_PORT ?= 8000

.PHONY: setup run bundle serve evaluate test check format clean

$(BIN)/genrnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the build at hand, so the range below never pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" || $(BIN)/pip install --quiet "torch>=2.2,<3"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/genrnn

# Serve with the container's own entry script (docker/entrypoint.sh), settings as GENRNN_*.
SERVE = GENRNN_MODEL=$(BUNDLE) GENRNN_HOST=$(GENRNN_HOST) GENRNN_PORT=$(GENRNN_PORT) PATH="$(abspath $(BIN)):$$PATH" \
	docker/entrypoint.sh serve $(SERVE_ARGS)

run: setup $(BUNDLE)/genrnn.json
	@$(SERVE)

bundle: $(BUNDLE)/genrnn.json

# Only when there is no bundle: training shows its progress and stops at the time budget
# with the best checkpoint so far; an interrupted run resumes where it stopped.
$(BUNDLE)/genrnn.json: | setup
	@echo "No bundle at $(BUNDLE): training $(TRAIN_CONFIG) for at most $(GENRNN_TRAIN_TIME) (GENRNN_TRAIN_TIME)."
	$(BIN)/genrnn train --config $(TRAIN_CONFIG) --output $(RUN_DIR) --max-time $(GENRNN_TRAIN_TIME) $(TRAIN_ARGS)

serve: setup
	@$(SERVE)

evaluate: setup $(BUNDLE)/genrnn.json
	$(BIN)/genrnn evaluate --model $(BUNDLE) --data builtin:cmudict:test --output $(RUN_DIR)/test-scores.json

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
