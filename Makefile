# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

# The dev environment: pinned torch 2.9.1 / torchaudio 2.9.1 + requirements + pytest (requirements-dev.txt).
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# The four-node pipeline on synthetic audio + a tiny generated checkpoint (or ACESTEP_CHECKPOINT_DIR).
demo: $(STAMP)
	$(PY) scripts/demo.py

# ruff first (config in pyproject.toml): a lint error stops before the suite's minutes are spent.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
