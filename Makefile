# The verbs of the study. `make book` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
JOBS ?= 1
STAMP := $(VENV)/.installed

.PHONY: help env measure-env data mathjax browser results book test reproduce lock clean-book

help:
	@echo "make book     environment + data + notebooks for PROFILE=$(PROFILE) + rendered book (book/_build/html)"
	@echo "make test     the test suite (pytest)"
	@echo "make env      the pinned virtual environment in $(VENV) (a no-op when up to date)"
	@echo "make measure-env  Python 3.10+ environment for the measurement commands only, using the torch already installed"
	@echo "make results  execute the notebooks of PROFILE into results/PROFILE/"
	@echo "make reproduce  re-run PROFILE afresh and compare with the committed tables"

# One pip resolve of the exact pins: torch 2.13.0 with timm/torchvision in the same call, so no CUDA
# packages are pulled on CPU machines.
# The pins are for Python 3.11+: refuse an older one before pip fails deep inside a resolve, and
# replace a .venv left by such an attempt (or otherwise broken) instead of reusing it.
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
env: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c '$(PY_OK)' 2>/dev/null || { echo "error: make env needs Python 3.11 or newer (requirements.txt is pinned for it); $(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing). Use: make env PYTHON=python3.11" >&2; exit 1; }
	@$(PY) -c '$(PY_OK)' 2>/dev/null || { test ! -e $(VENV) || echo "replacing the unusable $(VENV) (wrong Python or broken)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -c "import heart_lib, timm, torchvision; print('environment ok: torch', __import__('torch').__version__, 'timm', timm.__version__)"
	touch $@

# Re-resolve requirements.in into the exact pins of requirements.txt (maintainers only).
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet -r requirements.in
	build/lock-venv/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.txt

# The measurement commands alone, for Python 3.10+ with a torch already installed (a Jetson's JetPack
# wheel; seen through --system-site-packages), never the pinned CPU torch. Run them with
# `.venv-measure/bin/python -m heart_lib.measure.llm_cli ...` (LLMs) or `-m heart_lib.measure` (ViTs),
# which import neither the notebooks' nor the book's packages.
MEASURE_PYTHON ?= python3.10
measure-env:
	$(MEASURE_PYTHON) -m venv --system-site-packages .venv-measure
	.venv-measure/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || \
	  { echo "no torch for $(MEASURE_PYTHON): install NVIDIA's JetPack wheel (see book/llm_howto.md) or a CPU torch first"; exit 1; }
	.venv-measure/bin/pip install --quiet -r requirements-measure.txt
	.venv-measure/bin/pip install --quiet --no-deps timm==1.0.31
	.venv-measure/bin/pip install --quiet --no-deps --ignore-requires-python -e .
	.venv-measure/bin/python -m heart_lib.measure.llm_cli --help >/dev/null && echo "measure environment ok"

data: env
	$(PY) -m heart_lib data

# MathJax 3 served from the book itself (the default comes from a CDN, unreachable offline).
MATHJAX := build/npm/node_modules/mathjax/es5/tex-chtml.js
mathjax: $(MATHJAX)
$(MATHJAX):
	mkdir -p build/npm
	@cd build/npm && npm install --no-audit --no-fund --fetch-retries=1 --prefix . mathjax@3 >npm.log 2>&1 || \
	  { echo "error: npm could not install mathjax@3 (offline? no registry access?); npm said:" >&2; \
	    grep -iE "err|warn" npm.log | tail -n 8 >&2; echo "full log: build/npm/npm.log" >&2; exit 1; }
	test -f $@

# Headless Chromium for the browser test (Debian/Ubuntu package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	    (sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null) || \
	    echo "could not install chromium: the browser test will be skipped"; }

results: env data
	$(PY) -m heart_lib run --profile $(PROFILE) -j $(JOBS)

book: results mathjax
	$(PY) -m heart_lib book --profile $(PROFILE)

test: env mathjax browser
	$(PY) -m pytest -q

# Re-execute PROFILE afresh (scratch folder) and compare with the committed tables.
reproduce: env data
	$(PY) -m heart_lib reproduce --profile $(PROFILE) -j $(JOBS)

clean-book:
	rm -rf book/_build build/book-*
