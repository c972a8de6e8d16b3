# The two set-up commands: `make demo` and `make test`. Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench bench-memory bench-scale broker install lint clean deb

$(BIN)/gc-agent: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[agent,registry,htex,postgres,test,examples]'
	@touch $@

install: $(BIN)/gc-agent

broker:
	@bash deploy/rabbitmq/ensure-broker.sh

## demo: install, start broker + registry + agent, run the examples, stop what it started
demo: install broker
	@bash deploy/demo.sh

## test: the same set-up, then the whole suite, in TEST_WORKERS processes: most tests wait on
## brokers, agents and jobs, so three workers finish far sooner even on two cores (measured under
## the same load: 758 s with three, 1,043 s with two); TEST_WORKERS=0 runs it in this one
TEST_WORKERS ?= 3
test: install broker
	@bash deploy/ensure-test-tools.sh
	$(BIN)/pytest -n $(TEST_WORKERS)

## bench: throughput, latency and CPU per task beside raw AMQP, Celery, Dramatiq (Redis results) and
## Parsl, with issue 14's targets; where a lone call's time goes; memory on long sweeps (all in
## bench/RESULTS.md)
bench: install broker
	$(BIN)/pip install -q -e '.[agent,registry,htex,bench]'
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.legs
	$(BIN)/python -m bench.memory

## bench-memory: client, agent and registry RSS through long sweeps (a section of bench/RESULTS.md);
## a quick run: make bench-memory MEMORY_ARGS='--scale 0.01'
bench-memory: install broker
	$(BIN)/python -m bench.memory $(MEMORY_ARGS)

## bench-scale: one registry under simulated endpoints and clients, then endpoint quorum queues on a
## private 3-node cluster (a section of bench/RESULTS.md); small by default. Full scale:
## make bench-scale SCALE_REGISTRY_ARGS='--endpoints 1000 --clients 50 --duration 60' SCALE_QUEUES_ARGS='--steps 0,250,500,1000,2000,4000'
bench-scale: install broker
	$(BIN)/python -m bench.scale registry $(SCALE_REGISTRY_ARGS)
	$(BIN)/python -m bench.scale queues $(SCALE_QUEUES_ARGS)

## deb: the agent as a Debian package, dist/gc-fabric-agent_<version>_<arch>.deb
deb: install
	bash deploy/debian/build-deb.sh dist

lint: install
	$(BIN)/ruff check gc_core gc_agent gc_client tests examples bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo *.egg-info
