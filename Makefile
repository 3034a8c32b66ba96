# The front door: one target per study, plus setup, test, figures, bench.
PYTHON ?= python

.PHONY: setup demo test zoo sparsity layerwise word_order studies_i score bench

setup:  ## install the project and its test tools
	$(PYTHON) -m pip install -e ".[dev]"

demo:  ## the main job on the built-in default: a micro model, a few queries, top influential sequences
	$(PYTHON) -m experiments.demo

test:  ## the test suite (tiny models, a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

zoo:  ## world, tokenizer and four GPT-NeoX models, trained on CPU and cached under artifacts/
	$(PYTHON) -m experiments.zoo.build

sparsity:  ## study a: power-law tails and top shares of influence (needs `make zoo`)
	$(PYTHON) -m experiments.sparsity

layerwise:  ## study g: influence per layer and per model size (needs `make zoo`)
	$(PYTHON) -m experiments.layerwise

word_order:  ## study f: same-order vs flipped-order influence, plus the fine-tuning extension (needs `make zoo`)
	$(PYTHON) -m experiments.word_order

studies_i: sparsity layerwise word_order  ## the three studies of issue 6

score:  ## one query set over the training set in resumable shards (rank-32 query batching; torchrun for N processes)
	$(PYTHON) -m experiments.score

bench:  ## cost cutting: throughput ratio, low-rank accuracy, TF-IDF recall -> figures/bench/
	$(PYTHON) -m benchmarks.throughput && $(PYTHON) -m benchmarks.lowrank_accuracy && $(PYTHON) -m benchmarks.tfidf_recall
