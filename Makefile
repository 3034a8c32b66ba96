# The front door: one target per study, plus setup, test, figures, bench.
PYTHON ?= python

.PHONY: setup demo test plain sweep zoo sparsity layerwise word_order studies_i scale crosslingual math_code roleplay memorisation all figures score bench bench-setup bench-zoo bench-gpu bench-real-shape bench-real-shape-410m bench-covariance-subset validate validate_zoo validate_zoo_dense lds report findings

setup:  ## install the project and its test tools
	$(PYTHON) -m pip install -e ".[dev]"

demo:  ## the main job on the built-in default: a micro model, a few queries, top influential sequences
	$(PYTHON) -m experiments.demo

test:  ## the test suite (tiny models, a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

PLAIN ?= artifacts/plain
PLAIN_INPUTS = data=text_files data.path=$(PLAIN)/corpus.jsonl data.truncation=true queries.path=$(PLAIN)/queries.jsonl \
	+data.translations=$(PLAIN)/translations.jsonl
PLAIN_STUDIES := sparsity layerwise scale math_code roleplay crosslingual memorisation

plain:  ## a GPT-2 and a Llama built from configs, trained on Debian's licence texts (text only) -> figures/plain/
	$(PYTHON) -m experiments.plain --out $(PLAIN)
	$(PYTHON) -m experiments.score model.name_or_path=$(PLAIN)/gpt2 model.name=plain_gpt2 $(PLAIN_INPUTS) \
		run_dir=figures/plain/score influence.progress=false
	for study in $(PLAIN_STUDIES); do $(PYTHON) -m experiments.$$study 'models=[plain_gpt2,plain_llama]' \
		+model_paths.plain_gpt2=$(PLAIN)/gpt2 +model_paths.plain_llama=$(PLAIN)/llama $(PLAIN_INPUTS) \
		queries.names=null queries.held_out_order=0 figures_dir=figures/plain/$$study influence.progress=false || exit 1; done
	$(PYTHON) -m experiments.word_order 'models=[plain_gpt2,plain_llama]' +model_paths.plain_gpt2=$(PLAIN)/gpt2 \
		+model_paths.plain_llama=$(PLAIN)/llama $(PLAIN_INPUTS) queries.names=null queries.held_out_order=0 \
		probe_file=configs/probes/word_order_plain.yaml figures_dir=figures/plain/word_order influence.progress=false

STUDY ?= sparsity
MODELS ?= zoo_2xs,zoo_xs,zoo_s,zoo_m,zoo_l,zoo_xl
LAUNCHER ?= joblib
comma := ,
sweep:  ## STUDY over MODELS: one scoring job per model (LAUNCHER=joblib; submitit_slurm on SLURM), then the gather
	$(PYTHON) -m experiments.$(STUDY) -m 'models=[$(subst $(comma),]$(comma)[,$(MODELS))]' stage=score \
		hydra/launcher=$(LAUNCHER) $(SWEEP_ARGS)
	$(PYTHON) -m experiments.$(STUDY) 'models=[$(MODELS)]' stage=gather $(SWEEP_ARGS)

zoo:  ## world v3 (FINDINGS decision 7), tokenizer, six GPT-NeoX sizes x three seeds (2 processes), cached and resumable under artifacts/
	$(PYTHON) -m experiments.zoo.build

sparsity:  ## study a: power-law tails and top shares of influence (needs `make zoo`)
	$(PYTHON) -m experiments.sparsity

layerwise:  ## study g: influence per layer and per model size (needs `make zoo`)
	$(PYTHON) -m experiments.layerwise

word_order:  ## study f: the paper's probe protocol (six groups, forward and flipped apart), plus the fine-tuning extension
	$(PYTHON) -m experiments.word_order

studies_i: sparsity layerwise word_order  ## the three studies of issue 6

scale:  ## study b: abstraction vs scale: token overlap and relation of top sequences per model size
	$(PYTHON) -m experiments.scale

crosslingual:  ## study d (Figs 15-16): each size's top 10 English sequences translated to Korean/Turkish (zoo: every document rendered), re-scored
	$(PYTHON) -m experiments.zoo.translations artifacts/world/full/dataset
	$(PYTHON) -m experiments.crosslingual

math_code:  ## study c: structures behind the top influences of math and code queries, per model size
	$(PYTHON) -m experiments.math_code

memorisation:  ## study h (Sec 5.3.3): do the top sequences contain the passage the query completes? (needs `make zoo`)
	$(PYTHON) -m experiments.memorisation

roleplay:  ## study e: AI-shutdown dialogues and AI fiction in the shutdown query's top influence, per model size
	$(PYTHON) -m experiments.roleplay

STUDIES := sparsity layerwise word_order scale crosslingual math_code roleplay memorisation

all: zoo $(STUDIES) findings  ## the zoo and every study (scores are computed once per model and cached), then FINDINGS.md

findings:  ## FINDINGS.md's tables from figures/<study>/study.json, the zoo summary and zoo v1's verdicts (prose kept)
	$(PYTHON) -m experiments.findings

figures:  ## redraw every study's tables and figures from saved scores, recomputing nothing
	for study in $(STUDIES); do $(PYTHON) -m experiments.$$study compute=false || exit 1; done

report:  ## browsable HTML of every run with a study.json (figures/**, outputs/**): top sequences, tokens coloured -> outputs/report/ (+ figures/report/)
	$(PYTHON) -m experiments.report

score:  ## one query set over the training set in resumable shards (rank-32 query batching; torchrun for N processes)
	$(PYTHON) -m experiments.score micro_zoo=true

bench-setup:  ## the bench extra, then kronfluence and bergson without their torchvision requirement (figures/bench/README.md says why), and dattri-llm
	$(PYTHON) -m pip install -e ".[dev,bench]"
	$(PYTHON) -m pip install --no-deps kronfluence==1.0.1
	$(PYTHON) -m pip install simple-parsing jaxtyping natsort petname peft torchopt ml_dtypes bitsandbytes accelerate
	$(PYTHON) -m pip install --no-deps bergson==2.5.1
	$(PYTHON) -m pip install dattri-llm==0.1.0

bench-zoo:  ## the bench workloads' world, tokenizer and zoo model zoo_s seed 0 (~5 min on one core; `make zoo` builds them too); figures under artifacts/bench/zoo_figures
	$(PYTHON) -m experiments.zoo.build sizes=[zoo_s] seeds=[0] workers=1 figures_dir=artifacts/bench/zoo_figures

bench: bench-zoo  ## cost cutting (throughput, low-rank accuracy, TF-IDF recall), the gradient index, and ours vs kronfluence, dattri-llm and bergson (PEERS_ARGS="--grid full") -> figures/bench/
	$(PYTHON) -m benchmarks.throughput && $(PYTHON) -m benchmarks.lowrank_accuracy && $(PYTHON) -m benchmarks.tfidf_recall
	$(PYTHON) -m benchmarks.index
	$(PYTHON) -m benchmarks.peers $(PEERS_ARGS)

bench-real-shape:  ## Pythia-160m's dimensions, random weights, T=128, N=32 and 64: fixed and per-sequence costs apart -> figures/bench/real_shape.*
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.real_shape

bench-real-shape-410m:  ## the same at Pythia-410m's dimensions, N=32 (~35 min on one core, ~11 GB) -> figures/bench/real_shape_410m.*
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m benchmarks.real_shape --shape pythia-410m --sequences 32 --tokens 128 --queries 4 --name real_shape_410m

bench-covariance-subset:  ## EK-FAC with A, S from a fraction of the fitting batches (0.02 .. 1), the correction from all, and the one-pass fit: fit time over floor, per-query Pearson and top-100 overlap vs the full fit (zoo, gpt2_s; N=1000) -> figures/bench/covariance_subset.*
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m benchmarks.covariance_subset $(COVARIANCE_SUBSET_ARGS)

bench-gpu:  ## the real-shape tables on a GPU (fp32 and bf16, Pythia-410m dimensions); one line and exit 1 without one
	$(PYTHON) -m benchmarks.gpu

validate:  ## EK-FAC, K-FAC, diagonal, identity, LiSSA vs exact damped-GNH influence and the PBRF (figures/validate/)
	OMP_NUM_THREADS=1 $(PYTHON) -m experiments.validate

lds:  ## fine-tuning LDS (100 half-subsets x 2 seeds) and add-k-copies calibration, 8 methods (~15 CPU min) -> figures/validate/lds/
	OMP_NUM_THREADS=1 $(PYTHON) -m experiments.lds

validate_zoo:  ## the same on the zoo's zoo_xs (needs `make zoo`; ~40 min on 1 core) -> figures/validate/zoo_xs/
	OMP_NUM_THREADS=1 $(PYTHON) -m experiments.validate 'models=[zoo_xs]' figures_dir=figures/validate/zoo_xs

validate_zoo_dense:  ## exact dense-G ground truth on zoo_2xs's last MLP layer, 500 points x 10 fact queries (needs zoo_2xs seed 0) -> figures/validate/zoo_2xs_dense/
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m experiments.validate 'models=[zoo_2xs_dense]' figures_dir=figures/validate/zoo_2xs_dense $(VALIDATE_ARGS)
