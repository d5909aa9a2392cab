# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
# `make docs` takes the dashboard screenshots in docs/img/ (headless Chromium, a scene of its own).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test sqla-suite bench docs clean

# SQLAlchemy's dialect compliance suite against a real daemon (about 3 minutes; docs/sql.md):
# `make sqla-suite`, or SQLA_DB=--dburi=sqlite:///sqla_suite_sqlite.db for the sqlite file dialect.
# `make test` runs a small selection of it.
SQLA_QUICK := -k "ExceptionTest or IsolationLevelTest or AutocommitIsolationTest or LastrowidTest or \
	ReturningTest or RowFetchTest or SimpleUpdateDeleteTest or InsertBehaviorTest or DateTimeTest or \
	StringTest or IntegerTest or JSONTest or HasTableTest"

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	@bash scripts/install-system-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m bastion.demo

# ruff (rules in pyproject.toml) and mypy (its level there too: docs/design.md, "Checks of the source")
lint: setup
	$(BIN)/ruff check src tests bench sqla_suite
	$(BIN)/mypy

# Two workers, each taking whole files (module fixtures stay on one worker): most tests wait on
# daemons, networks and fsyncs rather than the CPU, so two at a time take about 0.6 of the time.
test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile
	cd sqla_suite && ../$(BIN)/python -m pytest -q test_suite.py $(SQLA_QUICK)

sqla-suite: setup
	cd sqla_suite && ../$(BIN)/python -m pytest -q test_suite.py $(SQLA_DB)

bench: setup
	$(BIN)/python bench/bench_contops.py && $(BIN)/python bench/bench_backup.py && \
	$(BIN)/python bench/bench_sql.py && $(BIN)/python bench/bench_failover.py && \
	$(BIN)/python bench/bench_capture.py && $(BIN)/python bench/bench_replication.py && \
	$(BIN)/python bench/bench_sync.py

docs: setup
	$(BIN)/python scripts/dashboard_shots.py docs/img

clean:
	rm -rf $(VENV) var bench/out .mypy_cache .ruff_cache
