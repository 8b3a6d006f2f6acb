# Two commands do everything on a fresh machine with Python 3.10+ and pip:
#   make demo   the landscape extraction on the embedded SmolLM2-135M and MMLU
#   make test   lint, lock check and the test suite
# Both create .venv and install the project into it when needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is a range in pyproject.toml; this is the build installed first (override: make TORCH=...)
TORCH  ?= torch==2.13.0
EXTRAS ?= dev

.PHONY: demo test lint format check-lock install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(PY) scripts/demo.py --config scripts/configs/demo.yaml

test: install lint check-lock
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check lib scripts tests bench $(wildcard notebook/*.py)
	$(VENV)/bin/ruff format --check lib scripts tests bench $(wildcard notebook/*.py)

format: install
	$(VENV)/bin/ruff format lib scripts tests bench $(wildcard notebook/*.py)
	$(VENV)/bin/ruff check --fix lib scripts tests bench $(wildcard notebook/*.py)

# poetry lives in its own venv: its pins must not steer the project's environment.
check-lock:
	test -x .tools/bin/poetry || ($(PYTHON) -m venv .tools && .tools/bin/pip install --quiet "poetry>=2,<3")
	.tools/bin/poetry check --lock

clean-demo:
	rm -rf results/demo
