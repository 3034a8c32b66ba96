"""Study b: abstraction vs scale. Do larger models' top influential sequences share the theme of a query rather
than its tokens, and do top influences shrink with scale?

    python -m experiments.scale                      # make scale (the zoo's sizes)
    influence-lab study scale --model PATH --data PATH --queries PATH    # any causal LM, a text-only corpus

Paper (Sec 5.3.1): the 810M model's top sequences share tokens with the query, the 52B model's share its
meaning; top influences shrink with scale (e.g. `trade` 0.681 at 810M vs 0.126 at 52B). Shown as in the paper
(per query and model the top sequences, "Influential Sequence for <model> (Influence = x)", tokens shaded red
for positive and teal for negative influence) and measured on any corpus (analysis/abstraction.py): token
overlap of the top k against a BM25-matched baseline, the share of the top influence held by sequences that
share no word with the completion, and the top-1 influence, per model size, with trend tests across sizes.
Ours, on the synthetic world only (its metadata columns present): how the top sequences relate to the query by
construction (same fact in the same or another language, same topic, unrelated).
"""

from __future__ import annotations

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.abstraction import finish_abstraction, stacked_shares_figure, start_abstraction, world_trend
from experiments.queries import Query
from experiments.study import (CONFIG_DIR, RELATIONS, WORLD_COLUMNS, StudyInputs, StudyOutput, known_label, known_pairs,
                               on_known_facts, relation, run_stage)

PAPER = "Sec 5.3.1 (top influential sequences per model size, Figs 11-13 style)"
# ---- the scale study's own rows on the synthetic world (ours) ----------------------------------------------------

def relation_rows(inputs: StudyInputs, query: Query, kept: pd.DataFrame) -> list[dict]:
    """How each counted top sequence relates to the query by construction (needs the world's columns)."""
    return [{"rank": int(r["rank"]), "train_id": int(r["train_id"]), "influence": float(r["influence"]),
             "relation": relation(query, r)} for _, r in kept.iterrows()]


def relation_shares(world: pd.DataFrame) -> pd.DataFrame:
    """Per model: share of the counted top sequences in each relation, and the related share (any but unrelated)."""
    shares = pd.crosstab(world["model"], world["relation"], normalize="index").reindex(columns=list(RELATIONS),
                                                                                        fill_value=0.0)
    first = world.drop_duplicates("model").set_index("model")
    shares = shares.reindex(first.index)
    shares.insert(0, "parameters", first["parameters"])
    shares.insert(1, "seed", first["seed"])
    shares["related"] = 1.0 - shares[RELATIONS[-1]]
    return shares.reset_index()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/scale")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("scale", run_dir, cfg.figures_dir)
    result, rows = start_abstraction(cfg, out, relation_rows, WORLD_COLUMNS | {"language"}, PAPER,
                                     "abstraction vs scale", "abstraction_vs_scale")
    if result.has_world and not result.world.empty:
        out.table("top_sequence_relations", result.world)
        shares = relation_shares(result.world)
        out.table("relation_shares", shares)
        out.figure("relation_shares", stacked_shares_figure(
            [("ours, synthetic world: relation by construction", shares)], RELATIONS,
            "share of counted top sequences", width=5),
            paper="Sec 5.3.1: ours (synthetic world), relation by construction")
        rows.append(world_trend(cfg, shares, "related", "ours (synthetic world): larger models' top sequences are "
                                "related by meaning (same fact in any language, or same topic)"))
        known = known_pairs(result.inputs, float(cfg.known_fact_min_share))
        if known is not None:  # the same on the fact queries whose fact each model knows
            mine = result.world[on_known_facts(result.world, known)]
            if not mine.empty:
                known_shares = relation_shares(mine)
                out.table("relation_shares_known_facts", known_shares)
                rows.append(world_trend(cfg, known_shares, "related", "ours (synthetic world): larger models' top "
                                        "sequences are related by meaning, on the fact queries of "
                                        + known_label(cfg.known_fact_min_share)))
    finish_abstraction(out, result, rows, cfg, "Abstraction vs scale (paper Sec 5.3.1).",
                       "Ours, only when the corpus has the synthetic world's columns: top_sequence_relations and "
                       "relation_shares (relation by construction).")


if __name__ == "__main__":
    main()
