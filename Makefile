# flashteam — every target humans, CI and hooks use. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# uv installs the environment from uv.lock; it lives in a venv of its own (.tools), pinned
# with the hashes of its wheels in requirements/uv.txt.
TOOLS  := .tools
UV     := $(TOOLS)/bin/uv
# Never download an interpreter: the lock is installed into the Python the machine has.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help install lock redis postgres promtool browser run demo test lint bench loadtest clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

redis: ## make sure redis-server is installed (apt-get when missing and possible)
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server is missing: installing it with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "flashteam needs redis-server 7 on PATH and cannot install it here (apt-get needs root)." >&2; \
	    echo "Install it yourself: 'sudo apt-get install redis-server' (Debian/Ubuntu) or 'brew install redis' (macOS)." >&2; \
	    exit 1; \
	  fi; }

postgres: ## make sure PostgreSQL's server binaries are installed (the suite starts its own)
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "PostgreSQL is missing: installing it with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "the test suite needs PostgreSQL's initdb and pg_ctl and cannot install them here." >&2; \
	    echo "Install them yourself: 'sudo apt-get install postgresql' or 'brew install postgresql'." >&2; \
	    exit 1; \
	  fi; }

promtool: ## make sure promtool is installed (Debian's prometheus package; its service is not started)
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool is missing: installing Debian's prometheus package with apt-get (its service is not started)"; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
	      trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
	    fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "the test suite checks deploy/prometheus with promtool and cannot install it here." >&2; \
	    echo "Install it yourself: 'sudo apt-get install prometheus' (Debian/Ubuntu) or 'brew install prometheus' (macOS)." >&2; \
	    exit 1; \
	  fi; }

browser: ## make sure headless Chromium and its driver are installed (the live page's browser test)
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium is missing: installing Debian's chromium and chromium-driver with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "the test suite opens the live page in headless Chromium and cannot install it here." >&2; \
	    echo "Install it yourself: 'sudo apt-get install chromium chromium-driver' (Debian/Ubuntu)." >&2; \
	    exit 1; \
	  fi; }

$(UV): requirements/uv.txt
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --isolated --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.txt
	touch $@

$(STAMP): pyproject.toml uv.lock $(UV)
	@$(UV) lock --locked --quiet || { \
	  echo "uv.lock does not match pyproject.toml: run 'make lock' to refresh it (then commit both)." >&2; \
	  exit 1; }
	$(UV) sync --locked --extra dev --python $(PYTHON) --quiet
	touch $@

install: redis $(STAMP) ## create .venv with exactly the versions in uv.lock (flashteam and its dev tools)

lock: $(UV) ## refresh uv.lock (and uv itself) to the newest releases, keeping them only if `make test` passes
	@before=$$(mktemp -d) && cp uv.lock requirements/uv.txt "$$before"/ && \
	echo uv | $(UV) pip compile - --universal --generate-hashes --upgrade --quiet \
	  --custom-compile-command 'make lock' -o requirements/uv.txt && \
	$(UV) lock --upgrade && \
	if $(MAKE) test; then rm -rf "$$before"; else \
	  cp "$$before"/uv.lock uv.lock; cp "$$before"/uv.txt requirements/uv.txt; rm -rf "$$before"; \
	  echo "the newest releases fail 'make test': uv.lock is back as it was." >&2; \
	  echo "Fix the code for them, or hold a package back in pyproject.toml, then run 'make lock' again." >&2; \
	  exit 1; fi

run: install ## start the engine locally on embedded defaults (private redis-server under ./var/, SQLite)
	$(BIN)/flashteam run

demo: install ## simulate a flash sale locally and print the outcome with a no-oversell check
	$(BIN)/flashteam demo

lint: install ## ruff and mypy --strict over the package and the tests
	$(BIN)/ruff check engine testkit tests bench loadtests
	$(BIN)/ruff format --check engine testkit tests bench loadtests
	$(BIN)/mypy

test: lint postgres promtool browser ## lint, then the suite on Python 3.11 (on Valkey), 3.12 (a subset) and 3.13 (RUNS="3.12:redis" for one)
	$(if $(RUNS),RUNS="$(RUNS)") PYTHON=$(PYTHON) scripts/test-matrix

bench: install postgres ## benchmarks (excluded from `make test`) with progress lines, then the report under bench/reports/
	$(BIN)/pytest bench -m benchmark -p no:cacheprovider -v -s --durations=0
	$(BIN)/python -m bench.make_report

loadtest: install ## Locust spike on a local engine, then the invariant verdict (ARGS="--help" lists the options)
	$(BIN)/python -m loadtests.run $(ARGS)

clean: ## remove the venvs and local data
	rm -rf $(VENV) $(VENV)-* $(TOOLS) var .pytest_cache .mypy_cache .ruff_cache
