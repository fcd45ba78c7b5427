# Two ways in on a fresh machine: `make smoke` (the whole pipeline, offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# `make test CONSTRAINTS=constraints.txt` installs exactly the versions the suite last passed with (see constraints.txt).
CONSTRAINTS ?=
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export MPLBACKEND := Agg

.PHONY: smoke test lint report same-results

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(PIP_C)
	touch $@

smoke: $(VENV)/.installed
	FLME_PROFILE=smoke $(PY) -m helpers pipeline --profile smoke

# A structural change must not move a number: keep results/smoke from before it (cp -r results/smoke BEFORE), then
# `make same-results BEFORE=...` retrains the whole smoke pipeline from nothing and compares every CSV with it.
BEFORE ?=
same-results: $(VENV)/.installed
	@test -n "$(BEFORE)" || { echo "BEFORE=<folder of results/smoke CSVs from before the change> is required"; exit 2; }
	rm -rf runs results/smoke notebooks/executed
	FLME_PROFILE=smoke $(PY) -m helpers pipeline --profile smoke
	$(PY) tests/same_results.py $(BEFORE) results/smoke

# Flower (optional) for tests/test_flower.py; resolved together with requirements.txt (it pins e.g. packaging<26).
$(VENV)/.installed-flower: $(VENV)/.installed requirements-flower.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-flower.txt $(PIP_C)
	touch $@

# Every test runs single-threaded: WORKERS processes share the machine's cores (one test file each at a time, so a
# notebook's cells stay in one kernel). CI machines have 2 cores.
WORKERS ?= 2
test: $(VENV)/.installed $(VENV)/.installed-flower
	FLME_PROFILE=smoke $(PY) -m pytest -q tests notebooks --ignore=notebooks/executed --nbval-lax -p no:cacheprovider -n $(WORKERS) --dist loadfile

lint: $(VENV)/.installed
	$(PY) -m ruff check helpers tests conftest.py
	$(PY) -m ruff format --check helpers tests conftest.py

# The report from whatever is in results/<PROFILE>/ (and the study's settings, results/<PROFILE>/setup.csv, written from the
# configs and the notebooks' plans first): its figures and tables (helpers.reporting.report), then
# report/main-<PROFILE>.pdf with latexmk (needs a LaTeX installation: see docs/report.md). latexmk's output goes to
# report/main-<PROFILE>.latexmk.log; a failed build prints the LaTeX errors.
PROFILE ?= smoke
report: $(VENV)/.installed
	@$(PY) -m helpers setup --profile $(PROFILE)
	@$(PY) -m helpers.report --profile $(PROFILE) --pdf
