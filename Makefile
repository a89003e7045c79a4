# mscnn — the two commands a newcomer runs: `make demo`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mscnn demo $(if $(FULL),--full)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -o addopts=-ra tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(QUICK),--quick)

lint: $(STAMP)
	$(VENV)/bin/ruff check mscnn pipelines tests benchmarks

clean:
	rm -rf outputs mlruns mlflow.db ray_results .pytest_cache
