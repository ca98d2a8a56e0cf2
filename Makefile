# One entry point for people and CI. `make demo` and `make test` set everything up on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
REPOSITORY  ?= model_repository
# The local MNIST copy when there is one (offline machines); otherwise mnist-train downloads it.
MNIST_DATA_DIR ?= $(wildcard ../shared/datasets/mnist)
export MNIST_DATA_DIR
# Likewise Fashion-MNIST, the second data set (else /usr/share/datasets/fashion-mnist, else a download).
FASHION_MNIST_DATA_DIR ?= $(wildcard ../shared/datasets/fashion-mnist)
export FASHION_MNIST_DATA_DIR

.PHONY: install demo train serve test test-fast docs docs-serve proto proto-check loadtest batching-study bench curve lock clean soak overload swarm-up swarm-down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

## The main job: train (article recipe), export, verify parity, publish to $(REPOSITORY); then serve it
## and load-test it for a minute.
demo: install
	$(BIN)/mnist-train --out $(REPOSITORY)
	$(MAKE) loadtest

train: install
	$(BIN)/mnist-train --out $(REPOSITORY) $(ARGS)

serve: install
	$(BIN)/mnist-serve --model-repository $(REPOSITORY) $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

## The unit tier and the fastest integration tests (markers from tests/conftest.py's TIERS).
test-fast: install
	$(BIN)/python -m pytest -m fast $(ARGS)

## The documentation site into site/ (reference pages generated from the code; broken links fail).
docs: install
	$(BIN)/mkdocs build --strict $(ARGS)

docs-serve: install
	$(BIN)/mkdocs serve -a 127.0.0.1:8001 $(ARGS)

## Regenerate the gRPC stubs from proto/*.proto (committed; `make proto-check` proves they match).
proto: install
	$(BIN)/python proto/generate.py

proto-check: install
	$(BIN)/python proto/generate.py --check

loadtest: install
	$(BIN)/python -m loadtest.run --model-repository $(REPOSITORY) $(ARGS)

batching-study: install
	$(BIN)/python -m loadtest.batching_study --model-repository $(REPOSITORY) $(ARGS)

bench: install
	$(BIN)/python -m bench.bench_serving --model-repository $(REPOSITORY) $(ARGS)

## Latency against throughput, concurrency 1..128 at 1 and 64 images per call (docs/figures/curve.png).
curve: install
	$(BIN)/python -m bench.curve --model-repository $(REPOSITORY) $(ARGS)

## Reliability: steady mixed load (with hostile calls) checked for correctness and RSS over time,
## printed and plotted (bench/results/soak.png); `make soak ARGS="--minutes 10"`.
soak: install
	$(BIN)/python -m bench.soak --model-repository $(REPOSITORY) $(ARGS)

## Overload: goodput, p99 and shed calls at 0.5x to 4x the capacity (docs/figures/overload.png).
overload: install
	$(BIN)/python -m bench.overload --model-repository $(REPOSITORY) $(ARGS)

## A 3-node Docker Swarm on this machine (needs root): a registry, the images built and pushed, the
## model as a model image, deploy/swarm/stack.yml deployed and healthy (docs/swarm.md); swarm-down
## removes all of it, after any failure too.
swarm-up: install
	$(BIN)/python docker/local_swarm.py up --model-repository $(REPOSITORY) $(ARGS)

swarm-down:
	$(PYTHON) docker/local_swarm.py down $(ARGS)

## Refresh constraints.txt from a fresh resolve of pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q -e '.[dev]'
	( head -2 constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v mnist-cnn-serving ) > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) artifacts reports bench/results
