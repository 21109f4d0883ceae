# segflow: `make demo` runs the whole pipeline on embedded defaults, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow test-all lint bench demo clean

install: $(STAMP)

# The lock pins the set that installs together on a fresh machine (torch 2.13.0 CPU wheel).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev,bench]'
	touch $@

test: $(STAMP)
	$(PY) -m ruff check segcore pipelines flows tests benchmarks
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest -m ''

lint: $(STAMP)
	$(PY) -m ruff check segcore pipelines flows tests benchmarks
	$(PY) -m ruff format --check segcore pipelines flows tests benchmarks

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: $(STAMP)
	$(VENV)/bin/segflow demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
