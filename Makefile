# Two commands on a fresh machine: `make demo` (install + the main job on the toy model) and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: install demo test lint results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/clipforget unlearn --model toy --mode global --classes star

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# two pytest workers, one test file each at a time: much of the suite waits on servers and subprocesses, so a
# second worker fills the idle core (tests/conftest.py gives each worker one torch thread)
test: install lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

results: install
	$(VENV)/bin/python bench/results.py --json runs/results.json --markdown docs/RESULTS.md
