# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	@command -v sqlite3 >/dev/null 2>&1 || { \
	  echo "installing the sqlite3 command-line shell (tests use it as an application)"; \
	  (apt-get update -qq && apt-get install -y -qq sqlite3) >/dev/null || { \
	    echo "error: could not install Debian package sqlite3; install it (apt-get install sqlite3) and retry" >&2; exit 1; }; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m bastion.demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python bench/bench_contops.py

clean:
	rm -rf $(VENV) var bench/out
