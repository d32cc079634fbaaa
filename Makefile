# Quick start: `make demo` (installs what is missing, runs the whole path) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# FAISS's OpenMP threads spin-wait by default, which stalls a 2-core box shared with
# ONNX Runtime and torch; PASSIVE makes idle threads sleep.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint imports check lock clean

# Dependencies come from the lock file (requirements/dev.lock: .[train,serve,dev,loadtest]
# resolved for Linux x86-64, Python 3.11; `make lock` regenerates it), then the project
# itself without dependencies.  The lock pins the CPU build of torch (torch==2.13.0+cpu):
# pip finds it in its configured sources (a local wheel store), or, where it is not there,
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
LOCK ?= requirements/dev.lock
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r $(LOCK) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	touch $@

setup: $(VENV)/.installed
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian/Ubuntu package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; }; }

demo: setup
	$(VENV)/bin/t2diff demo

test: setup
	# pytest exits 5 when it collects no tests; that is not a failure of the code.
	$(PY) -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The layering contract in pyproject.toml ([tool.importlinter]): cli -> release | worker -> service ->
# index_builder | model -> contracts; the service never imports torch or model/.
imports: setup
	$(VENV)/bin/lint-imports

# What CI runs: lint, the import contract, then the whole suite.
check: lint imports test

# Regenerate requirements/*.lock from pyproject.toml (requirements/compile.sh; needs uv).
UV ?= uv
TORCH_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
lock:
	UV=$(UV) TORCH_LINKS=$(TORCH_LINKS) requirements/compile.sh

clean:
	rm -rf .demo runs artifacts indexes
