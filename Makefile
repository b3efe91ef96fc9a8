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

.PHONY: demo test env clean browser

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,torch,parity,onnx,cloud,video,browser]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt grad-cam timm 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -c "import lclsc_jax, jax, flax, optax, grain, orbax.checkpoint, tensorflow_datasets, torch, safetensors, s3fs, gcsfs, moto, nibabel, monai, av, playwright"
	rm -f $(VENV)/.installed-*
	touch $@

# Train on the built-in synthetic pCLE data, evaluate on held-out patients, write saliency figures.
demo: $(STAMP)
	$(BIN)/lclsc demo --workdir $(WORKDIR)

# Debian's Chromium, for the report's browser test (tests/test_report_browser.py); that test is skipped, with the
# reason, on a machine where it cannot be installed (not root, no apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report's browser test (once)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
	    >/dev/null 2>&1 || echo "note: chromium did not install; the browser test will be skipped"; \
	else echo "note: no chromium (and not root with apt); the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
