# Set-up is part of every target: a fresh machine needs only Python 3.10+ and these commands.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 takes the CPU build on this machine's disk; a GPU cluster installs its own torch first
# (pyproject.toml only asks for torch>=2.4), then `pip install -e .[loggers,methods]`.
TORCH  ?= torch==2.13.0

.PHONY: run test test-first-day test-fast bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[loggers,methods,eval,plot,cluster,sweep,data,ray,dev]"
	touch $(STAMP)

install: $(STAMP)

## The default job: a tiny Llama on the built-in demo corpus, about a minute on a laptop CPU.
run: $(STAMP)
	@$(VENV)/bin/effitrain run_dir=outputs/default overwrite=true $(ARGS)
	@echo "(the effitrain command lives in $(VENV)/bin: 'source $(VENV)/bin/activate' puts it on your PATH)"

## The whole test suite (what CI runs). Two workers or more (pytest-xdist): most tests wait on a subprocess, a
## file or a cluster, so one worker used under one core of two. A test file stays on one worker (--dist loadfile):
## module fixtures (the SLURM cluster, trained runs several tests read) are made once.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile -m "not first_day" $(ARGS)

## Every shipped recipe from the console script on an empty cache, as a new user runs them (about half an hour on
## 2 cores, most of it the cold work of a fresh cache: kept out of `make test`; CI runs it as a step of its own).
test-first-day: $(STAMP)
	$(PY) -m pytest -q -p no:xdist -m first_day $(ARGS)

## Unit tests only (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiproc" $(ARGS)

## Benchmarks; results and their commands go to docs/benchmarks.md.
bench: $(STAMP)
	$(PY) scripts/bench_overhead.py --write docs/benchmarks.md $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
