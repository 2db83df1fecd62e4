# Two commands do all set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup run test test-fast lint format bench clean browser

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/genpipe run

# Two test processes: much of the suite waits on one-threaded server start-ups and Python imports,
# which a second process overlaps. Whole files go to one process, so module fixtures start once, and the
# files of one group (tests/conftest.py's FILE_GROUPS) to the same process, which makes their shared run once.
TEST_PROCESSES ?= 2

# Tests marked `alone` need most of the machine's memory, so they run after the others, by themselves.
test: $(STAMP) lint browser
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile -m "not alone" --durations=15
	$(BIN)/python -m pytest -m alone --durations=5

# The browser tests drive Debian's chromium and its driver; installed once, a no-op when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# The inner loop while developing: lint plus every test that starts no server and no Ray (models, the
# trainer in-process, data and DVC, the registry on SQLite) and compiles nothing. CI runs the whole
# suite (`make test`). tests/integration is all `integration`: not even collected here (its imports).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile -m "not integration and not compiles and not alone" --ignore=tests/integration --durations=5

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/density.py

clean:
	rm -rf $(VENV) prepared artifacts ray_results mlruns mlflow.db

# Local server stack on 127.0.0.1 (MLflow with basic auth, Prefect, a 2-node Ray); see infra/README.md.
.PHONY: stack-up stack-down
stack-up: $(STAMP)
	GENPIPE_BIN=$(BIN) infra/stack/up.sh

stack-down: $(STAMP)
	GENPIPE_BIN=$(BIN) infra/stack/down.sh
