# raytag: `make demo` and `make test` work on a fresh clone; they create .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: the CPU wheel on these machines. An unpinned torch (or one pulled in
# by another package) resolves to a multi-GB CUDA build. pyproject allows 2.11+ (GPU boxes).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.raytag-installed

export RAY_USAGE_STATS_ENABLED ?= 0
# DeepSpeed on the CPU only where there is no GPU: on a GPU machine it finds CUDA itself.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install browser demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) trainer/main.py --config configs/demo.yaml run.new_run=true

# The report's browser test drives Debian's Chromium (tests/test_report.py): installed here where
# it is absent, apt-get is there and we are root (CI, fresh containers); elsewhere the test skips
# and says why (under CI=true it fails).
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the report's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	fi

# `-m tests`: pytest, then an exit without the interpreter's native teardown (tests/__main__.py
# says why). -X faulthandler: a crash prints every thread's Python stack.
test: install browser
	$(PY) -X faulthandler -m tests -ra

test-fast: install
	$(PY) -X faulthandler -m tests -ra -m "not slow and not integration and not distributed"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy trainer launcher cluster

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(PY) bench/quality.py

clean:
	rm -rf runs bench/out .pytest_cache .mypy_cache .ruff_cache
