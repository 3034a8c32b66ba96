# The front door: one target per study, plus setup, test, figures, bench.
PYTHON ?= python

.PHONY: setup demo test zoo

setup:  ## install the project and its test tools
	$(PYTHON) -m pip install -e ".[dev]"

demo:  ## the main job on the built-in default: a micro model, a few queries, top influential sequences
	$(PYTHON) -m experiments.demo

test:  ## the test suite (tiny models, a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

zoo:  ## world, tokenizer and four GPT-NeoX models, trained on CPU and cached under artifacts/
	$(PYTHON) -m experiments.zoo.build
