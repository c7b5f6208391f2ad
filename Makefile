# Two commands on a fresh machine (Python >= 3.12 + pip): `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# jax >= 0.11 needs Python >= 3.12: find one, or stop with a clear message.
PYTHON ?= $(shell for p in python3.12 python3.13 python3 $$HOME/.pyenv/versions/3.12*/bin/python3 $$HOME/.pyenv/versions/3.13*/bin/python3; do \
  if $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then command -v $$p || echo $$p; break; fi; done)
export XLA_PYTHON_CLIENT_PREALLOCATE=false

.PHONY: demo test test-slow install install-test lint clean

$(VENV)/.installed: requirements.txt setup.py
	@if [ -z "$(PYTHON)" ]; then echo "error: Python >= 3.12 not found (jax/flax need it); install python3.12 or set PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job: MAE pretraining on the built-in synthetic cine data, then a segmentation fine-tune from it.
# Training runs under tcmalloc when it is installed (launch/with_tcmalloc.sh says why; without it, same results).
TRAIN := launch/with_tcmalloc.sh $(VENV)/bin/cinema-jax train
demo: install
	$(VENV)/bin/cinema-jax data synth --preview $(WORKDIR)/synthetic_preview.png
	$(TRAIN) --config=configs/mae_pretrain.py:smoke --workdir=$(WORKDIR)/mae
	$(TRAIN) --config=configs/finetune_seg.py:smoke --workdir=$(WORKDIR)/seg --config.init_from=$(WORKDIR)/mae
	@echo "demo outputs in $(WORKDIR): mae/ (checkpoints, metrics.jsonl, reconstructions) and seg/ (checkpoints, metrics, overlays)"

test: lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: install-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/pytest -q -m slow

lint: install-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
