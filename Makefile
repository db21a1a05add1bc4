# Everything runs inside .venv, created on first use from the pinned requirements.
VENV      ?= .venv
PYTHON    ?= python3
# Relative, so that a project folder whose path has spaces needs no quoting: every recipe
# runs in it.
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
ARGS      ?=
PORT      ?= 5001
UI_PORT   ?= 5000
UI_WORKERS ?= 1
MODEL     ?= models:/mnist-classifier@champion
# The store every target uses: MLFLOW_TRACKING_URI if set, else MLflow's default.
TRACKING  ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
# The experiment run, tune, ui and serve use: MLFLOW_EXPERIMENT_NAME if set, else a named
# one (plain `mlflow run .` keeps whatever experiment MLflow is given).
EXPERIMENT ?= $(or $(MLFLOW_EXPERIMENT_NAME),mnist-pipeline)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI := $(TRACKING)
# MLflow's launcher prints run links with the tracking URI as given, password included;
# the steps print their own, redacted ones.
export MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT ?= true
# MLflow's telemetry races its own HTTP client under load (docs/team-server.md): off for
# the launcher too, as in every step (steps/tracking/runtime/cli.py).
export MLFLOW_DISABLE_TELEMETRY ?= true
run tune ui serve: export MLFLOW_EXPERIMENT_NAME := $(EXPERIMENT)

.PHONY: setup run test test-fast lint ui serve mlserver mlserver-env checkov-env bench tune clean conda-env screenshots

setup: $(STAMP)

# uv installs the pins (pip installs uv, at the version requirements-dev.txt pins): it
# unpacks torch's 5 GiB in parallel and links files from its cache, about 40 s against
# pip's two minutes. Bytecode is compiled at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every step would otherwise compile torch and mlflow anew.
UV        := $(shell grep -E '^uv==' requirements-dev.txt)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(UV)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements-dev.txt
	touch $(STAMP)

run: setup  ## the whole pipeline; extra params: make run ARGS='-P dataset=digits'
	$(BIN)/mnist-pipeline-preflight
	$(BIN)/mlflow run . --env-manager local $(ARGS)

test: setup  ## the whole suite, slow tests included (what CI runs)
	$(BIN)/python -m pytest

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check steps tests bench tools plugins deploy
	$(BIN)/actionlint -shellcheck=$(BIN)/shellcheck
	$(BIN)/python tools/conda_env.py --check

# One person's UI: one worker, and without MLflow's GenAI job runner, which nothing here
# uses (seven more processes, about 50 s of CPU at every start: docs/results.md).
ui: export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
ui: setup  ## MLflow UI on the same store, opening on the experiment's training runs
	@$(BIN)/python -c "import mlflow; e = mlflow.MlflowClient().get_experiment_by_name('$(EXPERIMENT)'); \
	print('open http://127.0.0.1:$(UI_PORT)/#/experiments/' + e.experiment_id + '/runs?workflowType=machine_learning' if e else \
	      'no experiment $(EXPERIMENT) yet: run make run first')"
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING) --host 127.0.0.1 --port $(UI_PORT) \
		--workers $(UI_WORKERS)

serve: setup  ## REST server for the champion on 127.0.0.1:$(PORT)
	$(BIN)/mnist-pipeline-preflight --model "$(MODEL)" --port $(PORT)
	$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 --port $(PORT)

# MLServer (the KServe V2 server) needs an older FastAPI, Starlette and protobuf than the
# project's environment: it gets one of its own, with the same pins (docs/serving.md).
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_PORT ?= 8080
MLSERVER_GRPC_PORT ?= 8081

$(MLSERVER_VENV)/.installed: requirements.txt deploy/mlserver/requirements.txt \
		deploy/mlserver/excludes.txt | $(STAMP)
	$(BIN)/uv venv --quiet --allow-existing --python $(BIN)/python $(MLSERVER_VENV)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(MLSERVER_VENV)/bin/python \
		-r deploy/mlserver/requirements.txt --excludes deploy/mlserver/excludes.txt
	touch $@

mlserver-env: $(MLSERVER_VENV)/.installed

# checkov, the security scanner tests/test_deploy.py runs on deploy/, cannot share the
# project's pins either (requirements-checkov.txt says why): a virtualenv of its own.
CHECKOV_VENV ?= .venv-checkov

$(CHECKOV_VENV)/.installed: requirements-checkov.txt | $(STAMP)
	$(BIN)/uv venv --quiet --allow-existing --python $(BIN)/python $(CHECKOV_VENV)
	$(BIN)/uv pip install --quiet --python $(CHECKOV_VENV)/bin/python -r requirements-checkov.txt
	touch $@

checkov-env: $(CHECKOV_VENV)/.installed

# It serves the model deploy/mlserver/mnist-classifier/model-settings.json names: the
# champion (MLServer takes that file's uri over any environment variable).
mlserver: mlserver-env  ## the champion on MLServer's V2 protocol, 127.0.0.1:$(MLSERVER_PORT)
	PYTHONPATH="$(CURDIR)" MLSERVER_HTTP_PORT=$(MLSERVER_PORT) \
		MLSERVER_GRPC_PORT=$(MLSERVER_GRPC_PORT) \
		$(MLSERVER_VENV)/bin/mlserver start deploy/mlserver

tune: setup  ## hyperparameter sweep; extra params: make tune ARGS='-P trials=10'
	$(BIN)/mnist-pipeline-preflight
	$(BIN)/mlflow run . -e tune --env-manager local $(ARGS)

bench: setup  ## speed benchmark; writes bench/results.json
	$(BIN)/python bench/bench.py

screenshots: setup  ## re-take the README's UI tour pictures (docs/images/ui-*.png)
	UI_SCREENSHOTS=docs/images $(BIN)/python -m pytest tests/test_ui.py

conda-env:  ## rewrite conda.yaml from requirements.txt after a pin changes
	$(PYTHON) tools/conda_env.py

clean:
	rm -rf mlruns mlartifacts mlflow.db .pytest_cache
