# twostream: the named pipelines. PIPELINE picks the configuration (default: the demo).
#   make demo                  synthesise a small set, extract, train both streams, fuse, print the table
#   make test                  the test suite (CPU only)
#   make extract train-spatial train-temporal fuse-eval PIPELINE=pipelines/ucf101.toml
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIPELINE ?= pipelines/demo.toml
ARGS     ?=

.PHONY: setup test extract train-spatial train-temporal fuse-eval demo demo-data bench clean-demo

setup: $(VENV)/.installed

# Re-install only when the dependency list changes. torch's CUDA build also runs on CPU.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

extract: setup
	$(PY) -m flowprep extract --pipeline $(PIPELINE) $(ARGS)

train-spatial: setup
	$(PY) -m trainer train --stream spatial --pipeline $(PIPELINE) $(ARGS)

train-temporal: setup
	$(PY) -m trainer train --stream temporal --pipeline $(PIPELINE) $(ARGS)

fuse-eval: setup
	$(PY) -m trainer fuse-eval --pipeline $(PIPELINE) $(ARGS)

demo-data: setup
	$(PY) -m flowprep synth --pipeline pipelines/demo.toml

demo: PIPELINE = pipelines/demo.toml
demo: demo-data extract train-spatial train-temporal fuse-eval

bench: setup
	$(PY) benchmarks/extract_bench.py --quick
	$(PY) benchmarks/flow_bench.py --quick
	$(PY) benchmarks/train_bench.py --quick

clean-demo:
	rm -rf data/demo runs/demo
