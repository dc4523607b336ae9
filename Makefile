# The environment is a virtualenv made from setup.py; every target fills it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf demo-out build *.egg-info .pytest_cache
