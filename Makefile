# Everything runs inside .venv, created on first use from the pinned requirements.
VENV      ?= .venv
PYTHON    ?= python3
BIN       := $(CURDIR)/$(VENV)/bin
STAMP     := $(VENV)/.installed
ARGS      ?=
PORT      ?= 5001
UI_PORT   ?= 5000
MODEL     ?= models:/mnist-classifier@champion
# The store every target uses: MLFLOW_TRACKING_URI if set, else MLflow's default.
TRACKING  ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI := $(TRACKING)

.PHONY: setup run test test-fast lint ui serve bench tune clean conda-env

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: setup  ## the whole pipeline; extra params: make run ARGS='-P dataset=digits'
	$(BIN)/mlflow run . --env-manager local $(ARGS)

test: setup  ## the whole suite, slow tests included (what CI runs)
	$(BIN)/python -m pytest

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check steps tests bench tools

ui: setup  ## MLflow UI on the same store
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING) --host 127.0.0.1 --port $(UI_PORT)

serve: setup  ## REST server for the champion on 127.0.0.1:$(PORT)
	$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 --port $(PORT)

tune: setup  ## hyperparameter sweep; extra params: make tune ARGS='-P trials=10'
	$(BIN)/mlflow run . -e tune --env-manager local $(ARGS)

bench: setup  ## speed benchmark; writes bench/results.json
	$(BIN)/python bench/bench.py

conda-env:  ## rewrite conda.yaml from requirements.txt after a pin changes
	$(PYTHON) tools/conda_env.py

clean:
	rm -rf mlruns mlartifacts mlflow.db .pytest_cache
