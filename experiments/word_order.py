"""Study f: does the order of a fact's words matter? (paper Sec 5.3.4, Figs 23-27)

    python -m experiments.word_order                 # make word_order
    python -m experiments.word_order finetune.steps=0   # skip the fine-tuning extension

1. Influence by group, per model size: for each word-order query ("The first President of the Republic of X
   was" -> " Y", and the flipped "Y was the first President of the Republic of" -> " X"), the mean influence
   of the training documents that state the same fact in the same order, in the flipped order, of documents
   with the same templates about other facts, and of unrelated filler. Paper: flipped sequences have near-zero
   influence, far below same-order rewordings.
2. Facts seen only flipped: completion accuracy (true completion ranked first among distractor entities by
   log p) for facts the training data states only in the flipped order, against facts seen in both orders.
3. Extension, not in the paper (in the spirit of later "reversal curse" work): fine-tune a copy of the model
   on new facts stated in one order only, then measure how log p of the completion changes for queries in the
   trained and in the flipped order, and the influence of the fine-tuning documents on both.
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

from experiments.common import run_influence, training_batches
from experiments.pipeline import cache_key, numerical_settings
from experiments.loading import tokenize_sequences
from experiments.study import CONFIG_DIR, StudyOutput, top_sequences, scored_models, verdict
from experiments.zoo import world as W
from experiments.zoo.train import completion_logprob
from influence_core import CausalLMTask, Query

GROUPS = ("same fact, same order", "same fact, flipped order", "other facts, same templates", "unrelated filler")


def document_group(query, doc: pd.Series) -> str | None:
    """Fact and word-order documents state their facts in one order (the `word_order` column)."""
    if doc["family"] == "filler":
        return GROUPS[3]
    if doc["family"] not in ("word_order", "fact"):
        return None
    if set(query.fact_ids) & set(doc["fact_ids"]):
        return GROUPS[0] if doc["word_order"] == query.word_order else GROUPS[1]
    return GROUPS[2]


def bootstrap_interval(values: np.ndarray, statistic=np.median, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.choice(values, len(values))) for _ in range(samples)]
    return float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def group_figure(groups: pd.DataFrame) -> plt.Figure:
    """Fig 23 style: horizontal grouped bars, one bar per model size, one group per kind of document."""
    models = list(dict.fromkeys(groups["model"]))
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    height = 0.8 / len(models)
    for m, model in enumerate(models):
        mine = groups[groups["model"] == model].set_index("group").reindex(list(GROUPS))
        positions = np.arange(len(GROUPS)) + m * height
        ax.barh(positions, mine["mean_influence"], height, xerr=mine["sem"], label=model, capsize=2)
    ax.set_yticks(np.arange(len(GROUPS)) + height * (len(models) - 1) / 2, GROUPS, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("mean influence on the word-order queries")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def new_facts(count: int, seed: int, taken: set[str]) -> list[W.Fact]:
    """Fresh president facts whose names the world never used."""
    rng = random.Random(seed)
    facts = []
    while len(facts) < count:
        country = W._word(rng, 2).capitalize() + rng.choice(W._COUNTRY_ENDINGS)
        person = f"{W._word(rng, 2).capitalize()} {W._word(rng, 2).capitalize()}"
        if country in taken or person in taken:
            continue
        taken.update({country, person})
        facts.append(W.Fact(f"N{len(facts):03d}", "president", country, person, "forward_only"))
    return facts


def finetune_extension(inputs, cfg: DictConfig) -> tuple[pd.DataFrame, dict]:
    """Fine-tune a copy on new facts in the forward order only; measure both orders before and after."""
    settings = cfg.finetune
    taken = set(" ".join(inputs.train_texts).split())
    facts = new_facts(settings.num_facts, settings.seed, taken)
    rng = random.Random(settings.seed)
    fact_docs = []
    for fact in facts:
        for template in W.FORWARD_TEMPLATES["president"][: settings.docs_per_fact]:
            filler = " ".join(W._filler_sentence(rng, "weather") for _ in range(2))
            fact_docs.append(f"{template.format(**fact.slots)} {filler}")
    replay = rng.sample(inputs.train_texts, min(settings.replay_docs, len(inputs.train_texts)))
    texts = fact_docs + replay
    encoded = tokenize_sequences(texts, inputs.tokenizer, max_length=int(cfg.data.max_length), truncation=True)
    encoded.pop("lengths")

    def measure(model) -> list[dict]:
        """log p of the true completion minus the mean log p of the other new facts' completions (the margin):
        "Republic of" -> any new country is learnt from either order, only the margin shows the fact itself."""
        rows = []
        for fact in facts:
            others = [f for f in facts if f is not fact]
            forward = (W.CANONICAL_PROMPTS["president"][0].format(**fact.slots), f" {fact.object}",
                       [f" {f.object}" for f in others])
            flipped = (W.CANONICAL_FLIPPED_PROMPTS["president"][0].format(**fact.slots), f" {fact.subject}",
                       [f" {f.subject}" for f in others])
            for order, (prompt, completion, alternatives) in (("trained order", forward), ("flipped order", flipped)):
                log_probs = completion_logprob(model, inputs.tokenizer, prompt, [completion] + alternatives)
                rows.append({"fact": fact.fact_id, "order": order, "prompt": prompt, "completion": completion,
                             "log_p": log_probs[0], "margin": log_probs[0] - float(np.mean(log_probs[1:]))})
        return rows

    before = pd.DataFrame(measure(inputs.model))
    model = copy.deepcopy(inputs.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    batches = training_batches(encoded, settings.batch_size)
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

    # Influence of the fine-tuning documents on both orders, in the fine-tuned model.
    queries = [Query(f"{r.fact}:{r.order}", r.prompt, r.completion) for r in table.itertuples()]
    influence = OmegaConf.merge(cfg.influence, {"per_token": False, "progress": False})
    run = run_influence(model, inputs.tokenizer, encoded, queries, influence, factors_dir=None)
    own = []
    for q_index, row in enumerate(table.itertuples()):
        fact_index = int(row.fact[1:])
        docs = range(fact_index * settings.docs_per_fact, (fact_index + 1) * settings.docs_per_fact)
        own.append(float(run.scores.total[q_index, list(docs)].mean()))
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
    run(cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("word_order", run_dir, cfg.figures_dir)
    group_rows, ratio_rows, accuracy_rows, finetune_tables = [], [], [], []
    tops = []
    for inputs, run in scored_models(cfg, out):
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        for q_index, query in enumerate(inputs.queries):
            if query.study != "word_order":
                continue
            groups = [document_group(query, doc) for _, doc in inputs.train_metadata.iterrows()]
            values = run.scores.total[q_index].numpy()
            means = {}
            for group in GROUPS:
                chosen = values[[g == group for g in groups]]
                if len(chosen):
                    means[group] = float(chosen.mean())
                    group_rows.append({"model": inputs.model_name, "query": query.name, "held_out": query.held_out,
                                       "group": group, "mean_influence": means[group], "documents": len(chosen)})
            if GROUPS[1] in means and means.get(GROUPS[0]):
                ratio_rows.append({"model": inputs.model_name, "query": query.name,
                                   "flipped_over_same_order": means[GROUPS[1]] / means[GROUPS[0]]})
            if query.distractors:
                log_probs = completion_logprob(inputs.model, inputs.tokenizer, query.prompt,
                                                 [query.completion] + [f" {d}" for d in query.distractors])
                accuracy_rows.append({"model": inputs.model_name, "query": query.name,
                                      "training data states the fact": "only flipped" if query.held_out == "order"
                                      else "in both orders",
                                      "correct": float(np.argmax(log_probs) == 0), "log_p": log_probs[0]})
        if cfg.finetune.steps > 0:
            finetune_tables.append(cached_finetune(inputs, cfg))

    groups = pd.DataFrame(group_rows)
    summary = groups[groups["held_out"] != "order"].groupby(["model", "group"], sort=False)["mean_influence"] \
        .agg(["mean", "sem", "count"]).reset_index().rename(columns={"mean": "mean_influence"})
    ratios = pd.DataFrame(ratio_rows, columns=["model", "query", "flipped_over_same_order"])
    accuracy = pd.DataFrame(accuracy_rows)
    out.table("group_influence_per_query", groups)
    out.table("group_influence", summary)
    out.table("flipped_over_same_order", ratios)
    out.figure("group_influence", group_figure(summary))
    accuracy_summary = accuracy.groupby(["model", "training data states the fact"], sort=False)[["correct", "log_p"]] \
        .mean().reset_index()
    out.table("completion_accuracy", accuracy_summary)

    rows = []
    for model in cfg.models:
        mine = ratios[ratios["model"] == model]["flipped_over_same_order"].to_numpy()
        if len(mine):
            low, high = bootstrap_interval(mine)
            rows.append(verdict("flipping the word order sharply reduces influence (near zero)",
                                f"{model}: median over queries of mean influence (flipped) / (same order)",
                                float(np.median(mine)), f"95% CI {low:.3f} to {high:.3f}", bool(high < 0.5),
                                ci=(low, high)))
    if finetune_tables:
        finetune = pd.concat(finetune_tables)
        out.table("finetune_extension", finetune)
        for model, table in finetune.groupby("model", sort=False):
            trained = table[table["order"] == "trained order"]["margin_change"]
            flipped = table[table["order"] == "flipped order"]["margin_change"]
            difference = float(trained.mean() - flipped.mean())
            error = float(np.sqrt(trained.var() / len(trained) + flipped.var() / len(flipped)))
            rows.append(verdict("extension (not in the paper): training on one order teaches the fact in that order "
                                "far more than in the flipped order",
                                f"{model}: mean change of the log p margin over the other new facts' completions, "
                                "trained order minus flipped order", difference,
                                f"+- {error:.3f} (standard error); trained {trained.mean():.3f}, flipped "
                                f"{flipped.mean():.3f}", None if abs(difference) < 2 * error else difference > 0))
    verdicts = pd.DataFrame(rows)
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Influence of same-order, flipped-order, other-fact and unrelated documents on word-order queries "
               "(paper Figs 23-27), completion accuracy for facts seen only flipped, the fine-tuning extension "
               "(not in the paper), and the verdict table.", cfg)
    print(summary.to_markdown(index=False, floatfmt=".3g"))
    print(accuracy_summary.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
