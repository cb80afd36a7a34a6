# One command runs the system (make dev), one runs the tests (make test).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

# The local broker and Redis; override to point elsewhere.
export SUBSTRATE_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export SUBSTRATE_REDIS_URL ?= redis://127.0.0.1:6379/0
export SUBSTRATE_RABBITMQ_API_URL ?= http://guest:guest@127.0.0.1:15672
# The local broker's guest (loopback only) operates the dev fleet and the tests as an admin;
# op-admin is compose's. Operators added with `substratectl operators add` get their own roles.
export SUBSTRATE_ADMINS ?= guest,op-admin

.PHONY: install lock services lint format test test-only bytecode chaos dev bench dashboards definitions clean

# Exactly the versions in uv.lock (runtime, dev and bench), checked against its hashes: a new
# release of a dependency changes nothing until the lock is updated on purpose (make lock).
$(VENV)/.installed: uv.lock pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) --extra dev --extra bench
	touch $@

install: $(VENV)/.installed

# Resolves pyproject.toml's ranges again to the newest releases and rewrites uv.lock; commit the
# new lock on its own, once make test passes with it.
lock: install
	$(BIN)/uv lock --upgrade

# Makes sure RabbitMQ (with the management plugin) and Redis answer on localhost, installing
# them from Debian's packages where they are missing.
services:
	bash scripts/ensure-services.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m observability.dashboards --check
	$(BIN)/python -m deploy.rabbitmq --check
	$(BIN)/python scripts/check_docs.py

# The Grafana dashboards are generated from observability/dashboards.py.
dashboards: install
	$(BIN)/python -m observability.dashboards

# compose's broker definitions (users, permissions, topology) come from deploy/rabbitmq.py.
definitions: install
	$(BIN)/python -m deploy.rabbitmq

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install services lint test-only

# The slowest fault tests (marked chaos) run under make chaos only; one of each kind runs here.
# Two workers, each taking whole files (a file's tests share its fixtures): most of a test is
# waiting on the processes it started, so the two halve the wall time even on two cores.
TEST_WORKERS ?= 2
test-only: bytecode
	$(BIN)/pytest -m "not chaos" -n $(TEST_WORKERS) --dist loadfile

# The project's modules compiled before a suite (the installer compiles the dependencies): it
# starts hundreds of processes, and where PYTHONDONTWRITEBYTECODE is set (CI machines often set
# it) each one compiled every module it imports from source again, about a tenth of each start.
PACKAGES := common services cell_agent substratectl testing deploy observability bench
bytecode: install
	$(BIN)/python -m compileall -q $(PACKAGES)

# The fault suite at full size (make test runs it smaller): more cells in each faulted rollout
# and 2,000 fuzz examples per message type and file.
chaos: bytecode services
	SUBSTRATE_FAULT_CELLS=$${SUBSTRATE_FAULT_CELLS:-50} SUBSTRATE_FUZZ_EXAMPLES=$${SUBSTRATE_FUZZ_EXAMPLES:-2000} \
		$(BIN)/pytest -m fault -p no:cacheprovider

dev: bytecode services
	bash scripts/dev.sh

bench: bytecode services
	$(BIN)/python -m bench.bus --rounds 7

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .dev
