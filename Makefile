# Every user-facing target bootstraps .venv on first use: torch first (TORCH_SPEC, override it for a
# CUDA build), then the project with that torch pinned as a constraint so no other build is pulled.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.installed
CONFIG ?= conf/default.yaml
ARGS ?=
RESUME ?=
RUN ?=
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: venv train eval compare info bench sync ui test clean
.DEFAULT_GOAL := train

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel >/dev/null
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip freeze | grep -iE '^torch(==| @)' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project

train: $(STAMP)  ## tokenize (once), train CONFIG, log to MLflow; resumes an interrupted run
	$(PY) -m pipelines train $(if $(RESUME),--resume $(RESUME),$(CONFIG)) $(ARGS)

eval: $(STAMP)  ## evaluate the latest MoE run of CONFIG against its dense baseline (trains what is missing)
	$(PY) -m pipelines eval $(CONFIG) $(ARGS)

compare: $(STAMP)  ## the experiment's MLflow runs side by side (table + plot)
	$(PY) -m pipelines compare $(ARGS)

info: $(STAMP)  ## total vs active parameters and FLOPs per token of CONFIG
	$(PY) -m pipelines info $(CONFIG) $(ARGS)

bench: $(STAMP)  ## MoE layer and training-step speed vs the FLOP-matched dense model (runs/bench/latest.json)
	$(PY) -m pipelines bench $(ARGS)

sync: $(STAMP)  ## send the MLflow records a run kept while its server was down: make sync RUN=<name>
	$(PY) -m pipelines sync $(RUN) $(ARGS)

ui: $(STAMP)  ## MLflow UI on the default store, bound to 127.0.0.1
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host $(HOST) --port $(PORT)

test: $(STAMP)  ## the whole test suite, CPU only
	$(PY) -m pytest -q tests $(ARGS)

clean:  ## remove caches (keeps runs/, data and mlflow.db)
	rm -rf .pytest_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
