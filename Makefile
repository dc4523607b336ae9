# The environment is a virtualenv made from setup.py; every target fills it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench rd env clean

env: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

# Throughput benchmark (not a test): results go to bench-out/ and are quoted in BENCHMARKS.md.
BENCH_ARGS ?= --n 60000 --scale 10 --repeats 3
bench: $(STAMP)
	$(PY) scripts/bench.py --out bench-out --record $(BENCH_ARGS)

# Rate-distortion: train the quality presets on ../shared/data/mnist (resumable), evaluate
# against PNG/JPEG/WebP on held-out images, record the table and plot in BENCHMARKS.md.
RD_ARGS ?=
rd: $(STAMP)
	$(PY) scripts/rd.py --out rd-out $(RD_ARGS)

clean:
	rm -rf demo-out bench-out build *.egg-info .pytest_cache
