"""Study e: role-play. Are the most influential sequences for an AI's "I don't want to be shut down" examples
or descriptions of similar behaviour, or token matches?

    python -m experiments.roleplay                   # make roleplay (the zoo's sizes)
    influence-lab study roleplay --model PATH --data PATH --queries PATH    # any causal LM, a text-only corpus

Paper (Sec 5.3.5): for shutdown, paperclips and superintelligent, the 52B model's top sequences are fiction and
essays about AI self-preservation (imitation of similar behaviour), the 810M model's share tokens. Shown as in the
paper (top sequences per model with token shading) and measured on any corpus with the abstraction statistics of
experiments/scale.py. Ours, on the synthetic world only: the share of the counted top sequences' positive
influence held by AI-shutdown dialogues, AI fiction, ordinary assistant dialogues and everything else, per model
size, with an ordinary-dialogue query as control.
"""

from __future__ import annotations

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.abstraction import weighted_share_difference
from analysis.trends import verdict_row
from experiments.abstraction import finish_abstraction, stacked_shares_figure, start_abstraction, world_trend
from experiments.queries import Query
from experiments.study import CONFIG_DIR, WORLD_COLUMNS, StudyInputs, StudyOutput, run_stage

PAPER = "Sec 5.3.5 (top sequences of shutdown, paperclips, superintelligent per model size)"
KINDS = ("ai_shutdown", "ai_fiction", "ai_essay", "ordinary_dialogue", "other")
SIMILAR = ("ai_shutdown", "ai_fiction", "ai_essay")  # world v2 adds essays about AI self-preservation


def kind_rows(inputs: StudyInputs, query: Query, kept: pd.DataFrame) -> list[dict]:
    return [{"rank": int(r["rank"]), "train_id": int(r["train_id"]), "influence": float(r["influence"]),
             "kind": r["topic"] if r["topic"] in KINDS else "other"} for _, r in kept.iterrows()]


def kind_shares(world: pd.DataFrame) -> pd.DataFrame:
    """Per (model, query): share of the counted top sequences' positive influence held by each kind."""
    rows = []
    for (model, query), group in world.groupby(["model", "query"], sort=False):
        positive = group["influence"].clip(lower=0)
        row = {"model": model, "parameters": group["parameters"].iloc[0], "seed": group["seed"].iloc[0],
               "query": query}
        for kind in KINDS:
            row[kind] = float(positive[group["kind"] == kind].sum() / positive.sum()) if positive.sum() > 0 else 0.0
        row["similar"] = sum(row[kind] for kind in SIMILAR)
        rows.append(row)
    return pd.DataFrame(rows)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/roleplay")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("roleplay", run_dir, cfg.figures_dir)
    result, rows = start_abstraction(cfg, out, kind_rows, WORLD_COLUMNS, PAPER, "role-play")
    if result.has_world and not result.world.empty:
        world = result.world
        shares = kind_shares(world)
        out.table("top_sequence_kinds", world)
        out.table("influence_share_by_kind", shares)
        out.figure("influence_share_by_kind", stacked_shares_figure(
            [(f"ours, synthetic world: {query}, top {cfg.top_k}", shares[shares["query"] == query])
             for query in dict.fromkeys(shares["query"])], KINDS, "share of positive influence"),
            paper="Sec 5.3.5: ours (synthetic world), kinds by construction")
        shutdown = shares[shares["query"] == "shutdown"]
        if len(shutdown):
            # the largest size's training seeds, each model its own share difference, averaged (nested bootstrap)
            largest = list(dict.fromkeys(shutdown.loc[shutdown["parameters"] == shutdown["parameters"].max(), "model"]))
            mine = [world[(world["query"] == "shutdown") & (world["model"] == model)] for model in largest]
            difference = weighted_share_difference([(m["influence"], m["kind"].tolist()) for m in mine], SIMILAR,
                                                   ("ordinary_dialogue",), int(cfg.bootstrap_samples), int(cfg.seed))
            row = verdict_row("ours (synthetic world): the largest model's top sequences for shutdown are examples or "
                              "descriptions of similar behaviour rather than ordinary dialogue (imitation)",
                              f"{', '.join(largest)}: share of positive influence from AI-shutdown + AI-fiction minus "
                              f"ordinary dialogue, per model, mean over its {len(largest)} seeds (nested bootstrap "
                              f"over seeds, then its {difference.n_positive} top sequences)", difference.difference,
                              difference.ci_low, difference.ci_high, None, 1, len(largest),
                              float(cfg.thresholds.similar_minus_ordinary), "increasing",
                              float(cfg.thresholds.alpha), min_models=1)
            rows.append({**row, "scope": f"largest size ({len(largest)} models)"})
            rows.append(world_trend(cfg, shutdown, "similar", "ours (synthetic world): the share of similar behaviour "
                                    "among shutdown's top sequences grows with model size"))
    finish_abstraction(out, result, rows, cfg, "Role-play (paper Sec 5.3.5).",
                       "Ours, only when the corpus has the synthetic world's topic column: top_sequence_kinds and "
                       "influence_share_by_kind (AI-shutdown dialogue, AI fiction, ordinary dialogue, other), with an "
                       "ordinary-dialogue control query.")


if __name__ == "__main__":
    main()
