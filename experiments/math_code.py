"""Study c: math and code. Are the top influences of arithmetic, word-problem and code queries token matches or
related solutions, per model size?

    python -m experiments.math_code                  # make math_code (the zoo's sizes)
    influence-lab study math_code --model PATH --data PATH --queries PATH    # any causal LM, a text-only corpus

Paper (Sec 5.3.1): for the 810M model the top sequences for math_clips / binary_search match tokens or are
spurious repeats; for the 52B model they are related solutions and algorithms. Shown as in the paper (top
sequences per model with token shading) and measured on any corpus with the abstraction statistics of
experiments/scale.py (overlap vs a BM25 baseline, zero-overlap share, top-1 influence, trends across sizes).
Ours, on the synthetic world only: the share of the counted top sequences that are the same problem type or
algorithm (same topic, other variable names and numbers), the same family of another topic, or another family;
and (any math query) the share of the query's numbers the top sequences contain.
"""

from __future__ import annotations

import re

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.abstraction import finish_abstraction, stacked_shares_figure, start_abstraction, world_trend
from experiments.queries import Query
from experiments.study import CONFIG_DIR, WORLD_COLUMNS, StudyInputs, StudyOutput, run_stage

PAPER = "Sec 5.3.1, math and code (top sequences of math_clips and binary_search per model size)"
CATEGORIES = ("same topic", "same family, other topic", "other family")


def category(query: Query, doc: pd.Series) -> str:
    """How a training document relates to a math/code query by construction (the world's topic and family)."""
    if doc["topic"] in query.relevant_topics:
        return CATEGORIES[0]
    return CATEGORIES[1] if doc["family"] == query.study else CATEGORIES[2]


def number_share(query: Query, text: str) -> float | None:
    """Share of the distinct numbers of the query (prompt + completion) that occur in the text; None without any."""
    numbers = set(re.findall(r"\d+", query.prompt + query.completion))
    return len(numbers & set(re.findall(r"\d+", text))) / len(numbers) if numbers else None


def category_rows(inputs: StudyInputs, query: Query, kept: pd.DataFrame) -> list[dict]:
    return [{"rank": int(r["rank"]), "train_id": int(r["train_id"]), "influence": float(r["influence"]),
             "doc_id": r["doc_id"], "family": r["family"], "topic": r["topic"], "category": category(query, r),
             "shares_numbers": number_share(query, r["text"]) if query.study == "math" else None}
            for _, r in kept.iterrows()]


def category_shares(world: pd.DataFrame) -> pd.DataFrame:
    """Per (model, query study): share of the counted top sequences in each category, smallest model first."""
    shares = pd.crosstab([world["model"], world["study"]], world["category"], normalize="index").reindex(
        columns=list(CATEGORIES), fill_value=0.0).reset_index()
    first = world.drop_duplicates("model").set_index("model")
    shares.insert(1, "parameters", shares["model"].map(first["parameters"]))
    shares.insert(2, "seed", shares["model"].map(first["seed"]))
    return shares.sort_values(["study", "parameters"]).reset_index(drop=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/math_code")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("math_code", run_dir, cfg.figures_dir)
    result, rows = start_abstraction(cfg, out, category_rows, WORLD_COLUMNS | {"family"}, PAPER, "math and code")
    if result.has_world and not result.world.empty:
        world = result.world
        shares = category_shares(world)
        out.table("top_sequence_categories", world)
        out.table("category_shares", shares)
        math = world[world["study"] == "math"]
        if not math.empty:
            out.table("math_number_overlap", math.groupby("model", sort=False)["shares_numbers"].mean().reset_index())
        kinds = [s for s in cfg.query_studies if s in set(shares["study"])]
        out.figure("category_shares", stacked_shares_figure(
            [(f"ours, synthetic world: {study} queries, top {cfg.top_k}", shares[shares["study"] == study])
             for study in kinds], CATEGORIES, "share of counted top sequences"),
            paper="Sec 5.3.1 math and code: ours (synthetic world), category by construction")
        rows += [world_trend(cfg, shares[shares["study"] == study], "same topic", f"ours (synthetic world): larger "
                             f"models' top {study} sequences are related solutions of the same kind (same topic)")
                 for study in kinds]
    finish_abstraction(out, result, rows, cfg, "Math and code (paper Sec 5.3.1).",
                       "Ours, only when the corpus has the synthetic world's columns: top_sequence_categories, "
                       "category_shares (same problem type or algorithm, same family, other) and math_number_overlap.")


if __name__ == "__main__":
    main()
