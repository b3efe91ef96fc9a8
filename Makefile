# The two front-door commands: `make demo` and `make test`.
# Each creates its own virtual environment (.venv) pinned by constraints.txt.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
WORKDIR ?= runs/demo
PYTEST_WORKERS ?= 2

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,torch,parity,onnx,cloud]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt grad-cam timm 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -c "import lclsc_jax, jax, flax, optax, grain, orbax.checkpoint, tensorflow_datasets, torch, safetensors, s3fs, gcsfs, moto, nibabel, monai"
	rm -f $(VENV)/.installed-*
	touch $@

# Train on the built-in synthetic pCLE data, evaluate on held-out patients, write saliency figures.
demo: $(STAMP)
	$(BIN)/lclsc demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
