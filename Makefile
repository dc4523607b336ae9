# The environment is a virtualenv made from setup.py; every target fills it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench rd photo-rd photo-bench loader-bench fit-bench planted mutate scaling env clean

env: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

# Throughput benchmark (not a test): results go to bench-out/ and are quoted in BENCHMARKS.md.
BENCH_ARGS ?= --n 60000 --scale 10 --repeats 3
bench: $(STAMP)
	$(PY) scripts/bench.py --out bench-out --record $(BENCH_ARGS)

# Rate-distortion: train the quality presets on ../shared/data/mnist (resumable), evaluate
# against PNG/JPEG/WebP on held-out images, record the table and plot in BENCHMARKS.md.
RD_ARGS ?=
rd: $(STAMP)
	$(PY) scripts/rd.py --out rd-out $(RD_ARGS)

# Photo models on held-out BSDS500 photos against JPEG, WebP and AVIF (BD-rate, plot), recorded in BENCHMARKS.md.
PHOTO_RD_ARGS ?= --refine 50 --record
photo-rd: $(STAMP)
	$(PY) scripts/photo_rd.py --out rd-photos $(PHOTO_RD_ARGS)

# Photo encode/decode speed beside Pillow's codecs, and the peak memory of a 24-megapixel photo.
photo-bench: $(STAMP)
	$(PY) scripts/photo_bench.py --out bench-out/photos --record

# Images/s from a latent dataset through latentpack.open beside Pillow and datasets on the same images.
LOADER_ARGS ?= --n 10000
loader-bench: $(STAMP)
	$(PY) scripts/loader_bench.py --out bench-out/loader --record $(LOADER_ARGS)

# Fits from photo:4 to CIFAR-10, MNIST and grey photos for 10, 30 and 60 CPU-minutes, each judged
# on its domain's held-out images (needs ../shared/data and scripts/photo_data.py's photo-data/).
FIT_ARGS ?= --minutes 10 30 60
fit-bench: $(STAMP)
	$(PY) scripts/fit_bench.py --out bench-out/fit $(FIT_ARGS)

# Known bugs planted one at a time in a copy of the code: each must fail a test (docs/testing.md).
planted: $(STAMP)
	$(PY) scripts/planted_bugs.py --out bench-out/planted.md

# Mutation testing of pipeline/images.py, entropy.py and completion.py against their tests
# (setup.cfg's [mutmut]); survivors are listed by `mutmut results` and recorded in docs/testing.md.
mutate: $(STAMP)
	$(PY) -m pip install --quiet "mutmut>=3.3,<4"
	.venv/bin/mutmut run --max-children 2; .venv/bin/mutmut results

# The encode job on the DirectRunner and on Dask clusters of 1 and 2 workers, and the cloud cost
# per million images that follows, recorded in BENCHMARKS.md ("Scaling and cost").
scaling: $(STAMP)
	$(PY) scripts/scaling.py --out scaling-out --record

clean:
	rm -rf demo-out bench-out rd-photos rd-cifar scaling-out build *.egg-info .pytest_cache
