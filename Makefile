# Quick start: `make run` (the first-run demo on embedded defaults) and `make test` (everything the suite needs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit system-deps services bench bench-dispatch chaos fuzz \
	ha ha-down drills clean

install: $(STAMP)

# setup.py and the C source too: the editable install compiles gateway/media/_rtpsend.c in
# place, so a changed source must rebuild it.
$(STAMP): pyproject.toml setup.py gateway/media/_rtpsend.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

services: system-deps
	bash scripts/start-services.sh

# Uses ./ackline.yaml when present, else the first-run demo (ackline.demo.yaml: alert calls
# ring `ackline softphone examples/answer-and-ack.yaml` on this machine).
run: install system-deps
	ACKLINE_CONFIG="$${ACKLINE_CONFIG:-$$(test -f ackline.yaml && echo ackline.yaml || echo ackline.demo.yaml)}" \
		$(BIN)/ackline serve

# lint-imports: the layering contracts in pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit -q

test: install system-deps services lint typecheck
	$(BIN)/pytest -q

bench: install system-deps
	$(BIN)/python -m bench.calls

bench-dispatch: install services
	$(BIN)/python -m bench.dispatch

# Not part of `make test` (a few minutes; test_chaos_smoke.py runs a 10 s version there): its own
# PostgreSQL, Redis, SIPp carrier, API and two workers; kills them under load, prints a table.
chaos: install system-deps
	$(BIN)/python -m bench.chaos

# Not part of `make test` (~10 minutes; test_fuzz_smoke.py runs a seconds-long version there):
# 1,000,000 mutated SIP inputs, odd SDP, broken RTP and schemathesis against a real
# `ackline serve` in its own network namespace; prints a table, exits 1 on FAIL.
fuzz: install system-deps
	$(BIN)/python -m bench.fuzz

# The HA topology on this machine (bench/ha.py), left running: PostgreSQL with a synchronous
# standby (pg_auto_failover), Redis with Sentinel, two ackline nodes behind HAProxy.
ha: install system-deps
	bash scripts/ha-up.sh

ha-down:
	$(BIN)/python -m bench.ha down --workdir "$${ACKLINE_HA_DIR:-var/ha}"

# Every game-day drill in turn, each on its own topology (about 2 minutes each); reports in
# var/drills/. One drill: `.venv/bin/ackline drill node-crash`.
drills: install system-deps
	for s in db-primary-crash db-switchover redis-master-crash node-crash carrier-outage \
		rolling-restart; do $(BIN)/ackline drill $$s || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .import_linter_cache
