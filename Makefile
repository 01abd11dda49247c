# twostream: the named pipelines. PIPELINE picks the configuration (default: the demo).
#   make demo                  synthesise a small set, extract, train both streams, fuse, print the table
#   make test                  the whole test suite (CPU only); make test-fast leaves out the slow tests
#   make extract train-spatial train-temporal fuse-eval PIPELINE=pipelines/ucf101.toml
#   make train-fusion FUSION=attention [JOINT=1]    make ablate    make predict VIDEOS="a.avi b.mp4"
#   make synth extract ... PIPELINE=pipelines/synth12.toml   (the synthetic sets: demo, synth12, motion)
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIPELINE ?= pipelines/demo.toml
ARGS     ?=
FUSION   ?= attention
JOINT    ?=
VIDEOS   ?=

.PHONY: setup test test-fast imports synth extract train-spatial train-temporal fuse-eval train-fusion ablate predict \
        demo demo-data bench clean-demo

setup: $(VENV)/.installed

# Re-install only when the dependency list changes. torch's CUDA build also runs on CPU.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup imports
	$(PY) -m pytest -q

test-fast: setup imports
	$(PY) -m pytest -q -m "not slow"

# The layer contracts of setup.cfg: a lower package importing a higher one, or an import circle, fails here.
imports: setup
	$(VENV)/bin/lint-imports --no-cache

extract: setup
	$(PY) -m twostream.flowprep_cli extract --pipeline $(PIPELINE) $(ARGS)

train-spatial: setup
	$(PY) -m twostream train --stream spatial --pipeline $(PIPELINE) $(ARGS)

train-temporal: setup
	$(PY) -m twostream train --stream temporal --pipeline $(PIPELINE) $(ARGS)

fuse-eval: setup
	$(PY) -m twostream fuse-eval --pipeline $(PIPELINE) $(ARGS)

train-fusion: setup
	$(PY) -m twostream train-fusion --pipeline $(PIPELINE) --fusion $(FUSION) $(if $(JOINT),--joint) $(ARGS)

ablate: setup
	$(PY) -m twostream ablate --pipeline $(PIPELINE) $(ARGS)

predict: setup
	@test -n "$(VIDEOS)" || { echo 'give the videos: make predict VIDEOS="a.avi b.mp4"'; exit 2; }
	$(PY) -m twostream predict $(VIDEOS) --pipeline $(PIPELINE) $(ARGS)

synth: setup
	$(PY) -m twostream.flowprep_cli synth --pipeline $(PIPELINE)

demo-data: PIPELINE = pipelines/demo.toml
demo-data: synth

demo: PIPELINE = pipelines/demo.toml
demo: synth extract train-spatial train-temporal fuse-eval

bench: setup
	$(PY) benchmarks/extract_bench.py --quick
	$(PY) benchmarks/flow_bench.py --quick
	$(PY) benchmarks/train_bench.py --quick
	$(PY) benchmarks/loader_bench.py --quick

clean-demo:
	rm -rf data/demo runs/demo
