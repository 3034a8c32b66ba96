"""Build the zoo from nothing: world -> tokenizer -> four GPT-NeoX sizes -> evaluation -> figures.

    python -m experiments.zoo.build                      # the full zoo (make zoo)
    python -m experiments.zoo.build sizes=[zoo_xs] train.epochs=0.5

Every stage is cached under ``artifacts_root`` (world/<preset>, tokenizer/<preset>, zoo/<size>), so a
second run trains nothing and only re-evaluates. Figures go to ``figures_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_world_and_queries(preset: str, out_dir: Path, seed: int = 0):
    """Generate and save the world, and its queries; cached by its config and a digest of the generated documents (an
    edited generator rebuilds it). Returns (dataset_path, queries_path, queries)."""
    import datasets

    from experiments.zoo import world as W
    from experiments.zoo.queries import load_queries, make_queries, save_queries

    out_dir = Path(out_dir)
    config = W.world_config(preset, seed=seed)
    config_file = out_dir / "world_config.json"
    dataset_path = out_dir / "dataset"
    queries_path = out_dir / "queries.json"
    digest_file = out_dir / "documents_sha256.txt"
    fresh = (config_file.exists() and json.loads(config_file.read_text()) == json.loads(json.dumps(config.as_dict()))
             and digest_file.exists() and digest_file.read_text() == W.documents_digest(W.generate_documents(config)))
    if not (fresh and dataset_path.exists() and queries_path.exists()):
        if dataset_path.exists():
            import shutil

            shutil.rmtree(dataset_path)
        W.save_world(config, out_dir)
        train = datasets.load_from_disk(str(dataset_path))["train"]
        save_queries(make_queries(config, train), queries_path)
    return dataset_path, queries_path, load_queries(queries_path)


def evaluate_zoo(results: list, queries: list, heldout_fact_queries: list) -> "pandas.DataFrame":
    """Held-out loss and fact-ranking accuracies per size (each model loaded with from_pretrained).

    fact_accuracy: every fact asked in 3 held-out paraphrases (``heldout_fact_queries``); fact_study_accuracy:
    the one paraphrase per fact that the studies score (``queries``' "facts" study).
    """
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.zoo.queries import select
    from experiments.zoo.train import ranking_accuracy

    query_sets = {
        "fact_accuracy": list(heldout_fact_queries),  # held-out paraphrases of facts stated in training
        "fact_study_accuracy": select(queries, "facts"),
        "reversal_accuracy": select(queries, "word_order", held_out="order"),  # fact seen only flipped
        "forward_accuracy": select(queries, "word_order", word_order="forward", held_out=""),
        "flipped_accuracy": select(queries, "word_order", word_order="flipped"),
        "cross_lingual_accuracy": [q for q in select(queries, "cross_lingual") if q.language != "en"],
    }
    rows = []
    for r in results:
        model = AutoModelForCausalLM.from_pretrained(r.model_path)
        tokenizer = AutoTokenizer.from_pretrained(r.model_path)
        row = {
            "size": r.size,
            "non_embedding_params": r.non_embedding_parameters,
            "tokens_trained": r.tokens_trained,
            "train_minutes": round(r.train_seconds / 60, 1),
            "heldout_loss": round(r.heldout_loss, 4),
        }
        for key, qs in query_sets.items():
            row[key] = round(ranking_accuracy(model, tokenizer, qs), 3)
            row[key.replace("accuracy", "n")] = len(qs)
        rows.append(row)
    return pd.DataFrame(rows)


def write_figures(summary, results: list, figures_dir: Path, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(figures_dir / "zoo_summary.csv", index=False)
    header = "| " + " | ".join(summary.columns) + " |\n|" + "---|" * len(summary.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in summary.itertuples(index=False))
    note = (
        "\nAccuracies rank the true completion's log-probability against distractor entities of the same relation "
        f"(chance = {chance:.2f}). fact: 3 held-out paraphrases per fact (experiments/zoo/world.py EVAL_QUERY_TEMPLATES); "
        "fact_study: the first of them, the one the studies score; reversal: fact seen only in flipped order in training; "
        "forward/flipped: canonical templates; cross_lingual: Korean/Turkish prompts. Held-out loss: nats per token on the "
        "validation split.\n"
    )
    (figures_dir / "zoo_summary.md").write_text("# Zoo summary\n\n" + header + body + note)

    fig, (ax_train, ax_heldout) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        curve = pd.read_csv(Path(r.model_path).parent / "loss_curve.csv")
        smooth = curve["train_loss"].rolling(20, min_periods=1).mean()
        ax_train.plot(curve["tokens"], smooth, label=f"{r.size} ({r.non_embedding_parameters / 1e6:.2f}M)")
        heldout = curve.dropna(subset=["heldout_loss"])
        ax_heldout.plot(heldout["tokens"], heldout["heldout_loss"], marker="o", markersize=3, label=r.size)
    for ax, title in ((ax_train, "train loss (20-step mean)"), (ax_heldout, "held-out loss")):
        ax.set_xlabel("tokens trained")
        ax.set_ylabel("nats per token")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(figures_dir / "loss_curves.png", dpi=120)
    plt.close(fig)


def run_build(cfg) -> "pandas.DataFrame":
    """The whole pipeline for a config with the keys of configs/zoo/build.yaml."""
    from experiments.zoo.tokenizer import build_tokenizer
    from experiments.zoo.train import SIZES, TrainConfig, train_model

    root = (REPO_ROOT / cfg["artifacts_root"]).resolve()
    preset = cfg["world_preset"]
    started = time.perf_counter()
    dataset_path, _, queries = build_world_and_queries(preset, root / "world" / preset, seed=cfg["seed"])
    tokenizer_path = build_tokenizer(dataset_path, root / "tokenizer" / preset, vocab_size=cfg["vocab_size"])
    train_config = TrainConfig(**dict(cfg["train"]))
    import torch

    torch.set_num_threads(max(1, train_config.threads))  # also for evaluation when training is cached
    unknown = [s for s in cfg["sizes"] if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown model sizes {unknown}; choose from {sorted(SIZES)}")
    results = []
    for size in cfg["sizes"]:
        result = train_model(SIZES[size], tokenizer_path, dataset_path, root / "zoo" / size, train_config)
        print(f"[zoo] {size}: {result.non_embedding_parameters} non-embedding params, held-out loss {result.heldout_loss:.4f}, "
              f"{result.train_seconds / 60:.1f} min", flush=True)
        results.append(result)
    from experiments.zoo import world as W
    from experiments.zoo.queries import heldout_fact_queries

    summary = evaluate_zoo(results, queries, heldout_fact_queries(W.world_config(preset, seed=cfg["seed"])))
    n_distractors = max((len(q.distractors) for q in queries), default=9)
    write_figures(summary, results, REPO_ROOT / cfg["figures_dir"], chance=1 / (1 + n_distractors))
    (root / "zoo" / "manifest.json").write_text(json.dumps({
        "config": cfg, "results": [dataclasses.asdict(r) for r in results], "build_seconds": round(time.perf_counter() - started, 1),
    }, indent=1, default=str))
    print(summary.to_string(index=False), flush=True)
    return summary


def _main():
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "configs" / "zoo"), config_name="build")
    def main(cfg):
        run_build(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _main()
