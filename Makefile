# Quick start: `make demo` (installs what is missing, runs the whole path) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# FAISS's OpenMP threads spin-wait by default, which stalls a 2-core box shared with
# ONNX Runtime and torch; PASSIVE makes idle threads sleep.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,serve,dev,loadtest]'
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

clean:
	rm -rf .demo runs artifacts indexes
