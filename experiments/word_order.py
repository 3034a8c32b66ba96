"""Study f: does the order of a fact's words matter? (paper Sec 5.3.4, Figs 23-27)

    python -m experiments.word_order                      # make word_order: the zoo, probes from the world's facts
    python -m experiments.word_order finetune.enabled=false   # without the fine-tuning extension
    python -m experiments.word_order probe_file=configs/probes/word_order_paper.yaml \
        queries.path=configs/queries/paper.yaml 'queries.names=[first_president_astrobia,gleem]'   # the paper's probes
    influence-lab study word_order --model PATH --data PATH --queries PATH probe_file=configs/probes/word_order_plain.yaml

1. The paper's protocol (Figs 24-25): hand-written PROBE sequences, not in the training set, in six groups per
   query (experiments/probes.py: rewordings; the completion removed; meaning changed; irrelevant; order flipped;
   flipped with the relation removed), scored as candidate training sequences against the query with the
   training corpus's factors (pipeline.score_model(scored=...)). Per (model, query, group) the mean influence with
   a bootstrap CI over probes; per query the difference rewordings - order flipped with a CI; per model and query
   set the verdict "flipping the word order sharply reduces influence" (analysis/word_order.py), forward and
   flipped queries never pooled. Probes come from a probe file (`probe_file=`; the paper's own are
   configs/probes/word_order_paper.yaml) or, on the zoo, are generated from the world's facts
   (experiments/zoo/probes.py: the same six groups for every word-order query, forward and flipped; ours).
   Paper: flipping the order so that the completion comes first sharply reduces the influence.
2. Ours, zoo only: completion accuracy (true completion ranked first among distractors by log p) for facts the
   training data states only in the flipped order, against facts seen in both orders.
3. Extension, not in the paper (in the spirit of later "reversal curse" work), zoo only, `finetune.enabled`:
   fine-tune a copy of the model on new facts stated in one order only, then measure how log p of the
   completion changes for queries in the trained and in the flipped order, and the influence of the fine-tuning
   documents on both.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from analysis.word_order import flip_contrast, group_means, sharp_reduction_verdict
from experiments import pipeline
from experiments.loading import model_max_length
from experiments.pipeline import cache_key, numerical_settings
from experiments.probes import GROUP_LABELS, GROUPS, Probe, load_probe_file
from experiments.queries import Query as StudyQuery
from experiments.study import (CONFIG_DIR, REPO, WORLD_COLUMNS, StudyInputs, StudyOutput, known_label, known_pairs,
                               on_known_facts, run_stage, scored_models, size_groups, study_queries, top_sequences, verdict)
from experiments.zoo import vocabulary as V
from experiments.zoo.probes import filler_sentence, fresh_facts, load_facts, training_templates, world_probes
from experiments.zoo.train import completion_logprob
from influence_core import CausalLMTask, iterate_batches, model_fingerprint, track_layers

QUERY_SETS = {  # query_set -> its label in the verdicts (each set has its own verdict: never pooled)
    "forward": "forward queries",
    "forward, seen only flipped": "forward queries on facts the training data states only flipped (zoo)",
    "flipped": "flipped queries (the protocol applied to the flipped order; ours)",
}


def query_set(query: StudyQuery) -> str:
    """forward (a plain query counts as forward: it is written in the order it asks), forward on a fact seen
    only flipped, or flipped."""
    if query.word_order == "flipped":
        return "flipped"
    return "forward, seen only flipped" if query.held_out == "order" else "forward"


def resolve(path: str) -> Path:
    """A path as given, or relative to the repository (configs/probes/... from any folder)."""
    return Path(path) if Path(path).exists() or Path(path).is_absolute() else REPO / path


def study_probes(cfg: DictConfig, queries: list[StudyQuery]) -> tuple[list[Probe], str]:
    """The probes and where they come from: the probe file `probe_file`, or (probe_file=null) the world's facts."""
    if cfg.get("probe_file"):
        path = resolve(str(cfg.probe_file))
        return load_probe_file(path, queries), str(cfg.probe_file)
    world_dir = Path(cfg.data.path).parent
    if not (world_dir / "facts.json").exists():
        raise FileNotFoundError(f"word_order: no probes for {cfg.data.path}: it is not a synthetic world (no "
                                f"{world_dir / 'facts.json'}); give probe_file=configs/probes/word_order_plain.yaml or "
                                "your own probe file (see configs/probes/)")
    probes = world_probes(queries, load_facts(world_dir), int(cfg.probes_per_group), int(cfg.probes_seed))
    if not probes:
        raise ValueError("word_order: none of the study's queries is a word-order query of the world (study "
                         "word_order, one fact); add some to queries.names or give probe_file=FILE")
    return probes, "generated from the world's facts (experiments/zoo/probes.py)"


def score_probes(inputs: StudyInputs, probes: list[Probe], cfg: DictConfig) -> pd.DataFrame:
    """Every probe's influence on its query, the probes scored as sequences outside the training corpus with the
    corpus's factors. Columns: model, query, query_set, group, probe (index in its group), text, influence."""
    names = list(dict.fromkeys(p.query for p in probes))
    queries = [q for q in inputs.queries if q.name in names]
    texts = list(dict.fromkeys(p.text for p in probes))
    context = model_max_length(inputs.model)
    max_length = min(int(cfg.data.max_length), context) if cfg.data.get("max_length") else context
    scored = pipeline.corpus_from_texts(texts, inputs.tokenizer, max_length, "probes")
    scoring = pipeline.ScoringSettings.from_config(OmegaConf.merge(
        {"query_rank": None}, cfg.get("scoring") or {}, {"tfidf": {"top_k": None}, "top_k_tokens": 0}))
    arguments = (inputs.loaded, inputs.corpus, queries, cfg.influence, scoring, cfg.artifacts)
    scores = (pipeline.saved_model_scores(*arguments, scored=scored) if cfg.get("compute", True) is False
              else pipeline.score_model(*arguments, scored=scored))
    matrix = scores.matrix()  # (queries, probe texts)
    row_of = {name: i for i, name in enumerate(scores.query_names)}
    column_of = {text: j for j, text in enumerate(texts)}
    by_name = {q.name: q for q in queries}
    rows, counts = [], {}
    for p in probes:
        index = counts.get((p.query, p.group), 0)
        counts[(p.query, p.group)] = index + 1
        rows.append({"model": inputs.model_name, "query": p.query, "query_set": query_set(by_name[p.query]),
                     "group": p.group, "probe": index, "text": p.text,
                     "influence": float(matrix[row_of[p.query], column_of[p.text]])})
    return pd.DataFrame(rows)


def probe_figure(means: pd.DataFrame, queries: list[StudyQuery], models: list[str], sizes: dict[str, int]) -> plt.Figure:
    """Figs 24-25 layout: one panel per query, horizontal bars per probe group (paper order, top to bottom), one
    colour per model size (smallest first), 95% bootstrap CIs over probes."""
    columns = 1 if len(queries) == 1 else 2
    rows = int(np.ceil(len(queries) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 0.5 + 2.6 * rows), squeeze=False)
    height = 0.8 / len(models)
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(models)))
    for ax, query in zip(axes.flat, queries):
        for m, model in enumerate(models):
            mine = means[(means["model"] == model) & (means["query"] == query.name)].set_index("group").reindex(GROUPS)
            centre = mine["mean_influence"].to_numpy()
            error = np.nan_to_num(np.abs(np.vstack([centre - mine["ci_low"].to_numpy(),
                                                    mine["ci_high"].to_numpy() - centre])))
            label = f"{model} ({sizes[model] / 1e6:.3g}M)" if model in sizes else model
            ax.barh(np.arange(len(GROUPS)) + m * height, centre, height, xerr=error, color=colours[m], capsize=2,
                    error_kw={"lw": 0.8}, label=label)
        ax.set_yticks(np.arange(len(GROUPS)) + height * (len(models) - 1) / 2, [GROUP_LABELS[g] for g in GROUPS],
                      fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        prompt = query.prompt if len(query.prompt) <= 60 else "..." + query.prompt[-57:]
        ax.set_title(f"{query.name}\n{prompt!r} -> {query.completion[:30]!r}", fontsize=7)
        ax.set_xlabel("influence (mean over probes)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(queries):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(models), 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def completion_accuracy(inputs: StudyInputs) -> list[dict]:
    """Ours (zoo): is the true completion ranked first among the distractors by log p?"""
    rows = []
    for query in inputs.queries:
        if query.study != "word_order" or not query.distractors:
            continue
        log_probs = completion_logprob(inputs.model, inputs.tokenizer, query.prompt,
                                       [query.completion] + [f" {d}" for d in query.distractors])
        rows.append({"model": inputs.model_name, "query": query.name,
                     "training data states the fact": "only flipped" if query.held_out == "order" else "in both orders",
                     "correct": float(np.argmax(log_probs) == 0), "log_p": log_probs[0]})
    return rows


def finetune_extension(inputs, cfg: DictConfig) -> tuple[pd.DataFrame, dict]:
    """Fine-tune a copy on new facts in the forward order only; measure both orders before and after."""
    settings = cfg.finetune
    taken = set(" ".join(inputs.train_texts).split())
    facts = fresh_facts(settings.num_facts, settings.seed, taken)
    rng = random.Random(settings.seed)
    fact_docs = []
    for fact in facts:
        for template in training_templates("president", "forward")[: settings.docs_per_fact]:
            filler = " ".join(filler_sentence(rng, "weather") for _ in range(2))
            fact_docs.append(f"{template.format(**fact.slots)} {filler}")
    replay = rng.sample(inputs.train_texts, min(settings.replay_docs, len(inputs.train_texts)))
    texts = fact_docs + replay
    context = model_max_length(inputs.model)  # the study corpus's length limit (study.load_study_inputs)
    max_length = min(int(cfg.data.max_length), context) if cfg.data.get("max_length") else context
    corpus = pipeline.corpus_from_texts(texts, inputs.tokenizer, max_length,
                                        name=f"word-order fine-tuning set of {inputs.model_name}",
                                        truncation=bool(cfg.data.truncation))

    def measure(model) -> list[dict]:
        """log p of the true completion minus the mean log p of the other new facts' completions (the margin):
        "Republic of" -> any new country is learnt from either order, only the margin shows the fact itself."""
        rows = []
        for fact in facts:
            others = [f for f in facts if f is not fact]
            forward = (V.WORD_ORDER_QUERIES["forward"]["president"][0].format(**fact.slots), f" {fact.object}",
                       [f" {f.object}" for f in others])
            flipped = (V.WORD_ORDER_QUERIES["flipped"]["president"][0].format(**fact.slots), f" {fact.subject}",
                       [f" {f.subject}" for f in others])
            for order, (prompt, completion, alternatives) in (("trained order", forward), ("flipped order", flipped)):
                log_probs = completion_logprob(model, inputs.tokenizer, prompt, [completion] + alternatives)
                rows.append({"fact": fact.fact_id, "order": order, "prompt": prompt, "completion": completion,
                             "log_p": log_probs[0], "margin": log_probs[0] - float(np.mean(log_probs[1:]))})
        return rows

    before = pd.DataFrame(measure(inputs.model))
    model = copy.deepcopy(inputs.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    batches = iterate_batches(corpus.encoded, settings.batch_size)
    task = CausalLMTask()
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.steps):
        batch = batches[int(torch.randint(len(batches), (1,), generator=generator))]
        loss = task.training_loss(model, batch) / (batch["labels"] != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = pd.DataFrame(measure(model))
    table = before.rename(columns={"log_p": "log_p_before", "margin": "margin_before"})
    table = table.assign(log_p_after=after["log_p"], margin_after=after["margin"])
    table["change"] = table["log_p_after"] - table["log_p_before"]
    table["margin_change"] = table["margin_after"] - table["margin_before"]

    # Influence of the fine-tuning documents on both orders, in the fine-tuned model, through the one pipeline
    # (factors fitted on the fine-tuning set, cached by the fine-tuned weights' fingerprint).
    queries = [StudyQuery(f"{r.fact}:{r.order}", r.prompt, r.completion) for r in table.itertuples()]
    tuned = pipeline.LoadedModel(f"{inputs.model_name}-finetuned", f"{inputs.loaded.path} fine-tuned in memory",
                                 model, inputs.tokenizer, model_fingerprint(track_layers(model, ["*"])))
    influence = OmegaConf.merge(cfg.influence, {"per_token": False, "progress": False})
    scoring = pipeline.ScoringSettings.from_config({"query_rank": None, "tfidf": {"top_k": None}, "top_k_tokens": 0})
    scores = pipeline.score_model(tuned, corpus, queries, influence, scoring, cfg.artifacts, progress=False).matrix()
    own = []
    for q_index, row in enumerate(table.itertuples()):
        fact_index = int(row.fact[1:])
        docs = range(fact_index * settings.docs_per_fact, (fact_index + 1) * settings.docs_per_fact)
        own.append(float(scores[q_index, list(docs)].mean()))
    table["influence_of_own_fact_documents"] = own
    return table, {"fact_documents": len(fact_docs), "replay_documents": len(replay), "steps": settings.steps}


def cached_finetune(inputs, cfg: DictConfig) -> pd.DataFrame:
    """The fine-tuning extension's table, computed once per (model, settings) and kept under artifacts/."""
    key = cache_key({"finetune": OmegaConf.to_container(cfg.finetune), "influence": numerical_settings(cfg.influence),
                     "data": inputs.corpus.fingerprint, "model": inputs.loaded.fingerprint})
    path = Path(cfg.artifacts) / "finetune" / inputs.model_name / f"{key}.csv"
    if path.exists():
        return pd.read_csv(path)
    if cfg.get("compute", True) is False:
        raise FileNotFoundError(f"no saved fine-tuning results in {path}; compute=false only reads saved results: "
                                "run `make word_order` first")
    table, info = finetune_extension(inputs, cfg)
    table = table.assign(model=inputs.model_name, **info)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/word_order")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("word_order", run_dir, cfg.figures_dir)
    queries = study_queries(cfg)
    probes, source = study_probes(cfg, queries)
    score_tables, accuracy_rows, finetune_tables, tops = [], [], [], []
    sizes = {}
    for inputs, run in scored_models(cfg, out):
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        sizes[inputs.model_name] = inputs.loaded.record().non_embedding_parameters
        score_tables.append(score_probes(inputs, probes, cfg).assign(seed=inputs.loaded.seed or 0))
        accuracy_rows += completion_accuracy(inputs)
        if not cfg.finetune.enabled or cfg.finetune.steps <= 0:
            continue
        if WORLD_COLUMNS <= set(inputs.train_metadata.columns):
            finetune_tables.append(cached_finetune(inputs, cfg))
        else:
            print(f"word_order: the fine-tuning extension (not in the paper) needs the synthetic world; skipped on "
                  f"{inputs.corpus.path} (finetune.enabled=false silences this)")

    samples, confidence = int(cfg.bootstrap_samples), float(cfg.confidence)
    scores = pd.concat(score_tables, ignore_index=True)
    keys = ["model", "query", "query_set"]
    means = group_means(scores, keys, GROUPS, confidence, samples)
    contrast = flip_contrast(scores, keys, confidence=confidence, n_resamples=samples)
    probe_table = pd.DataFrame(probes, columns=["query", "group", "text"]).assign(source=source)
    out.table("probes", probe_table)
    out.table("probe_scores", scores)
    out.table("probe_group_influence", means)
    out.table("flip_contrast", contrast)

    by_name = {q.name: q for q in queries}
    probed = [by_name[n] for n in dict.fromkeys(scores["query"])]
    models = [inputs.model_name for inputs in out.inputs]  # run names: <model>_s<seed> with seeds
    forward = [q for q in probed if query_set(q) != "flipped"]
    flipped = [q for q in probed if query_set(q) == "flipped"]
    if forward:
        out.figure("probe_influence", probe_figure(means, forward, models, sizes), paper="Figs 24-25")
    if flipped:
        out.figure("probe_influence_flipped", probe_figure(means, flipped, models, sizes),
                   paper="Figs 24-25 (their protocol applied to the flipped queries; ours)")

    rows = []
    known = known_pairs(out.inputs, float(cfg.known_fact_min_share))
    subsets = [("all facts", scores)]
    if known is not None:  # zoo models: the same verdicts again on the facts each model knows
        subsets.append((known_label(cfg.known_fact_min_share), scores[on_known_facts(scores, known)]))
    for subset, table in subsets:
        for size, names in size_groups([i.loaded.record() for i in out.inputs]):  # the seeds of one size pooled: a two-level CI (seeds, then probes)
            for key, label in QUERY_SETS.items():
                mine = table[table["model"].isin(names) & (table["query_set"] == key)]
                if len(mine):
                    row = sharp_reduction_verdict(mine, float(cfg.flip_fraction), f"{size}, {label}", confidence,
                                                  samples)
                    rows.append({**row, "facts": subset, "n_model_queries": int(mine.groupby(["model", "query"]).ngroups)})
    if accuracy_rows:
        accuracy = pd.DataFrame(accuracy_rows)
        accuracy_summary = accuracy.groupby(["model", "training data states the fact"], sort=False)[
            ["correct", "log_p"]].mean().reset_index()
        out.table("completion_accuracy", accuracy_summary)
        print(accuracy_summary.to_markdown(index=False, floatfmt=".3g"))
    if finetune_tables:
        finetune = pd.concat(finetune_tables)
        out.table("finetune_extension", finetune)
        for model, table in finetune.groupby("model", sort=False):
            trained = table[table["order"] == "trained order"]["margin_change"]
            flipped_change = table[table["order"] == "flipped order"]["margin_change"]
            difference = float(trained.mean() - flipped_change.mean())
            error = float(np.sqrt(trained.var() / len(trained) + flipped_change.var() / len(flipped_change)))
            rows.append({"n_models": 1, "n_seeds": 1, **verdict(  # one model's row: not the study's sizes x seeds
                                "extension (not in the paper): training on one order teaches the fact in that order "
                                "far more than in the flipped order",
                                f"{model}: mean change of the log p margin over the other new facts' completions, "
                                "trained order minus flipped order", difference,
                                f"+- {error:.3f} (standard error); trained {trained.mean():.3f}, flipped "
                                f"{flipped_change.mean():.3f}", None if abs(difference) < 2 * error else difference > 0)})
    verdicts = out.verdicts(rows)
    out.top_sequences(pd.concat(tops))
    out.readme("The paper's word-order protocol (Sec 5.3.4, Figs 24-25): probe sequences outside the training set, "
               f"in six groups per query ({source}), scored against their query with the training corpus's factors; "
               "mean influence per group with bootstrap CIs over probes (probe_group_influence), the difference "
               "rewordings minus order-flipped probes per query (flip_contrast), and the verdict per model and query "
               f"set (forward and flipped queries apart; threshold flip_fraction={cfg.flip_fraction:g}, set before the "
               "results). Zoo only: completion accuracy for facts seen only flipped (ours) and the fine-tuning "
               "extension (not in the paper).", cfg)
    print(means.to_markdown(index=False, floatfmt=".3g"))
    print(contrast.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
