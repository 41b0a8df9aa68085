# iotgw developer commands. `make test` is what CI runs (.ci/run): it installs
# everything the tests need (Python packages; Mosquitto, Kafka and InfluxDB through
# the local stack) and runs lint and every test.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin

export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

DEMO_DEVICES ?= 50
DEMO_DURATION ?= 60

.PHONY: setup lint format test influxdb2 test-unit test-integration stack-up stack-down stack-status demo bench soak clean

setup: $(VENV)/.synced ## Create .venv with the locked dependencies and iotgw in it

# The only thing installed outside the lock: uv itself, bootstrapped with the machine's pip.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# The dev environment has every extra (the benchmark's); the image installs none.
$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	touch $@

lint: setup ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint influxdb2 ## lint, then every test; the local stack is brought up (and installed) as needed
	$(BIN)/pytest

influxdb2: setup ## build InfluxDB 2.7 once for the tests against it (about 6 minutes on a fresh machine, then cached)
	$(BIN)/python -m devstack.installer

test-unit: setup ## the tests that need no server
	$(BIN)/pytest -m unit

test-integration: setup influxdb2 ## the tests against real Mosquitto, Kafka and InfluxDB (1.6 and 2.7)
	$(BIN)/pytest -m "integration or faults"

demo: setup ## a fleet of 50 devices through the whole pipeline for 60 s, then an audit
	$(BIN)/iotgw stack up
	$(BIN)/python -m simulators.demo --devices $(DEMO_DEVICES) --duration $(DEMO_DURATION)

bench: setup ## iotgw against a tuned Telegraf and the ceilings; the writer into InfluxDB 1.6 and 2.7, rules (about 4 minutes)
	$(BIN)/iotgw stack up
	$(BIN)/iotgw bench

SOAK_RATE ?= 5000
SOAK_MINUTES ?= 10

soak: setup ## the bridge and the writer at 5,000 readings/s for 10 minutes, charted (not in `make test`)
	$(BIN)/iotgw stack up
	$(BIN)/python -m simulators.bench.soak --rate $(SOAK_RATE) --minutes $(SOAK_MINUTES)

stack-up: setup
	$(BIN)/iotgw stack up

stack-down: setup
	$(BIN)/iotgw stack down

stack-status: setup
	$(BIN)/iotgw stack status

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
