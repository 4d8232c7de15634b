# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and install the
# project into it with the CPU constraints (torch 2.13.0 CPU wheel, the boto3/s3fs pair); a second run is fast
# because the install is redone only when pyproject.toml or constraints-cpu.txt changed.
PYTHON ?= python3
# pytest-xdist workers of `make test` (the test files run in parallel, one file per worker at a time)
TEST_WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.relret-installed

.PHONY: demo test lint format bench clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[cpu,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m relret demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) bench/losses.py
	$(PY) bench/train.py

clean-venv:
	rm -rf $(VENV)
