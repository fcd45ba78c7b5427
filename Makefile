# Two ways in on a fresh machine: `make smoke` (the whole pipeline, offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export MPLBACKEND := Agg

.PHONY: smoke test lint

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

smoke: $(VENV)/.installed
	FLME_PROFILE=smoke $(PY) -m helpers pipeline --profile smoke

# Flower (optional) for tests/test_flower.py; resolved together with requirements.txt (it pins e.g. packaging<26).
$(VENV)/.installed-flower: $(VENV)/.installed requirements-flower.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-flower.txt
	touch $@

test: $(VENV)/.installed $(VENV)/.installed-flower
	FLME_PROFILE=smoke $(PY) -m pytest -q tests notebooks --nbval-lax -p no:cacheprovider

lint: $(VENV)/.installed
	$(PY) -m ruff check helpers tests conftest.py
	$(PY) -m ruff format --check helpers tests conftest.py
