# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and install the
# project into it with the CPU constraints (torch 2.13.0 CPU wheel, the boto3/s3fs pair); a second run is fast
# because the install is redone only when pyproject.toml or constraints-cpu.txt changed. The install also compiles
# DeepSpeed's CPU shared-memory op (g++ needed).
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
	@# DeepSpeed compiles its CPU shared-memory op with g++ on the first training run (about 30 s, cached in
	@# ~/.cache/torch_extensions): done here once, so that no training run, and no timed test, pays for it.
	@echo "compiling DeepSpeed's CPU shared-memory op (cached in ~/.cache/torch_extensions, shared by every .venv) ..."
	@$(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >$(VENV)/deepspeed-op-build.log 2>&1 \
		|| { echo "DeepSpeed's CPU shared-memory op did not compile (see $(VENV)/deepspeed-op-build.log): install g++" \
			"(apt-get install g++) and run make again" >&2; exit 1; }
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
