# The two commands a newcomer runs: `make demo` and `make test` (each creates .venv if missing).
# `make docs` builds the documentation site into site/ (warnings are errors).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On these machines torch 2.13.0 is a local CPU wheel; a looser pin downloads a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo report test test-fast lint format clean docs chromium

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.docs: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)" -e ".[docs]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py --root runs

# Table, PNGs and an HTML page from the demo's logs (reports/report.html).
report: $(VENV)/.installed
	$(VENV)/bin/lightning-gns report runs --out reports

# Headless Chromium renders the HTML report in a test (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The docs extra too: a test builds the site and opens its pages in Chromium. Two test
# processes of one thread each: the tests' models are tiny, and two-thread processes thrash.
# Work stealing: the multi-process tests take up to a minute each, so idle workers take
# what is left; the slowest 15 are printed, to keep the suite under 10 minutes.
test: $(VENV)/.docs chromium
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15

# The inner loop: everything but the tests marked slow (about a minute on 2 cores).
test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs reports lightning_logs .pytest_cache site dist build
