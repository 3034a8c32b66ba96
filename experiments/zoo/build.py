"""Build the zoo from nothing: world -> tokenizer -> GPT-NeoX sizes x training seeds -> competence -> figures.

    python -m experiments.zoo.build                                   # the full zoo (make zoo)
    python -m experiments.zoo.build 'sizes=[zoo_2xs,zoo_xl]' 'seeds=[0]'   # a pilot: two sizes, one seed

Every stage is cached under ``artifacts_root`` (world/<preset>, tokenizer/<preset>, zoo/<size>/seed<k>), so a
second run trains nothing and only re-evaluates; an interrupted run resumes from each model's last checkpoint.
Models train in ``workers`` parallel processes, one thread each, over (size, seed). Figures go to ``figures_dir``:
zoo_summary.csv (one row per size and seed), zoo_summary.md (with the competence bar of the config), loss curves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
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


def query_sets(queries: list, competence: list, competence_all: list) -> dict[str, list]:
    """The accuracies of the summary: name -> queries (each ranked against its distractors)."""
    from experiments.zoo.queries import select

    return {
        "competence": list(competence),  # held-out paraphrases of the queried facts (the bar)
        "competence_all_facts": list(competence_all),  # the same for every fact stated forward in training
        "study_query_accuracy": select(queries, "facts"),  # the studies' own fact queries
        "reversal_accuracy": select(queries, "word_order", held_out="order"),  # fact seen only flipped
        "forward_accuracy": select(queries, "word_order", word_order="forward", held_out="template"),
        "flipped_accuracy": select(queries, "word_order", word_order="flipped"),
        "cross_lingual_accuracy": select(queries, "cross_lingual"),
    }


def evaluate_model(result, sets: dict[str, list]) -> dict:
    """One summary row: shape, cost, held-out loss and every accuracy of ``sets`` (model loaded with from_pretrained).
    Beside the model, known_facts.json: per fact the share of its competence paraphrases it answers (what the studies
    need to report on the facts each model knows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.zoo.train import SIZES, ranking_hits

    model = AutoModelForCausalLM.from_pretrained(result.model_path)
    tokenizer = AutoTokenizer.from_pretrained(result.model_path)
    size = SIZES[result.size]
    row = {"size": result.size, "seed": result.seed, "hidden_size": size.hidden_size, "num_layers": size.num_layers,
           "learning_rate": size.learning_rate, "non_embedding_params": result.non_embedding_parameters,
           "tokens_trained": result.tokens_trained, "train_minutes": round(result.train_seconds / 60, 2),
           "cpu_minutes": round(result.cpu_seconds / 60, 2),
           "selected_step": result.selected_step, "steps": result.steps,
           "selection_accuracy": None if result.selection_accuracy is None else round(result.selection_accuracy, 3),
           "heldout_loss": round(result.heldout_loss, 4)}
    hits = {key: ranking_hits(model, tokenizer, qs) for key, qs in sets.items()}
    for key, qs in sets.items():
        row[key] = round(sum(hits[key]) / len(qs), 3) if qs else float("nan")
        row[key.replace("accuracy", "n") if key.endswith("accuracy") else key + "_n"] = len(qs)
    write_known_facts(sets["competence_all_facts"], hits["competence_all_facts"], Path(result.model_path).parent)
    return row


def write_known_facts(competence: list, hits: list[bool], out_dir: Path) -> Path:
    """out_dir/known_facts.json: per fact the share of its competence paraphrases the model answers (`hits`, per
    query: top-1 among the distractors, train.ranking_hits), read by the studies (experiments.study.known_fact_ids)."""
    known: dict[str, list[bool]] = {}
    for query, hit in zip(competence, hits):
        known.setdefault(query.fact_ids[0], []).append(hit)
    path = Path(out_dir) / "known_facts.json"
    path.write_text(json.dumps({fact: round(sum(hits) / len(hits), 3) for fact, hits in sorted(known.items())}, indent=1))
    return path


def evaluate_zoo(results: list, queries: list, competence: list, competence_all: list | None = None) -> "pandas.DataFrame":
    """The summary table: one row per (size, seed)."""
    import pandas as pd

    sets = query_sets(queries, competence, competence if competence_all is None else competence_all)
    return pd.DataFrame([evaluate_model(r, sets) for r in results])


def _train_and_evaluate(job: dict) -> dict:
    """One (size, seed) in its own process with one thread: train (or resume, or reuse) and evaluate."""
    import torch

    from experiments.zoo.train import SIZES, TrainConfig, train_model

    torch.set_num_threads(1)
    train = TrainConfig(**{**job["train"], "seed": job["seed"], "threads": 1})
    result = train_model(SIZES[job["size"]], job["tokenizer_path"], job["dataset_path"],
                         Path(job["out_dir"]), train, selection_queries=job["selection"])
    row = evaluate_model(result, job["sets"])
    print(f"[zoo] {job['size']} seed {job['seed']}: {result.non_embedding_parameters} non-embedding params, "
          f"held-out loss {result.heldout_loss:.4f}, competence {row['competence']:.3f}, "
          f"{result.train_seconds / 60:.1f} min", flush=True)
    return {"result": dataclasses.asdict(result), "row": row}


def competence_verdict(summary, bar: dict) -> dict:
    """The config's competence bar (written before any model was trained) against the summary: the largest size's
    mean competence over seeds >= bar.largest_at_least, and the size means rising with size (Spearman rho > 0 over
    sizes, and no size's mean below the smallest's)."""
    from scipy.stats import spearmanr

    means = summary.groupby("non_embedding_params")["competence"].mean().sort_index()
    largest = float(means.iloc[-1])
    rho = float(spearmanr(range(len(means)), means.values).statistic) if len(means) > 1 else float("nan")
    rising = bool(len(means) > 1 and rho > 0 and (means.values >= means.values[0]).all())
    return {"largest_mean_competence": round(largest, 3), "largest_passes": largest >= bar["largest_at_least"],
            "spearman_rho_over_sizes": round(rho, 3), "rising": rising,
            "passes": bool(largest >= bar["largest_at_least"] and (rising or not bar["rising_with_size"]))}


def write_figures(summary, results: list, figures_dir: Path, chance: float, verdict: dict, bar: dict) -> None:
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
        f"(chance = {chance:.2f}). competence: every queried fact (stated forward in training) in 3 held-out "
        "paraphrases (experiments/zoo/vocabulary.py EVAL_TEMPLATES, in no training sentence); competence_all_facts: "
        "the same for every fact stated forward; study_query: the studies' fact queries; reversal: facts seen only "
        "flipped in training, asked forward; forward/flipped: the word-order queries; cross_lingual: the Korean/Turkish "
        "fact queries. Held-out loss: nats per token on the validation split, of the kept weights. selected_step: the "
        "checkpoint kept, the one with the best selection_accuracy on a third set of paraphrases "
        "(vocabulary.VALIDATION_TEMPLATES, every fact stated forward; never the competence set), evaluated every "
        "train.eval_every steps.\n\n"
        f"Competence bar (configs/zoo/build.yaml, written before any model was trained): {bar}. "
        f"Result: {verdict}.\n"
    )
    (figures_dir / "zoo_summary.md").write_text("# Zoo summary\n\n" + header + body + note)

    fig, (ax_train, ax_heldout) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        curve = pd.read_csv(Path(r.model_path).parent / "loss_curve.csv")
        smooth = curve["train_loss"].rolling(20, min_periods=1).mean()
        label = f"{r.size} s{r.seed} ({r.non_embedding_parameters / 1e6:.2f}M)"
        ax_train.plot(curve["tokens"], smooth, label=label, linewidth=0.8)
        heldout = curve.dropna(subset=["heldout_loss"])
        ax_heldout.plot(heldout["tokens"], heldout["heldout_loss"], marker="o", markersize=2, label=label, linewidth=0.8)
    for ax, title in ((ax_train, "train loss (20-step mean)"), (ax_heldout, "held-out loss")):
        ax.set_xlabel("tokens trained")
        ax.set_ylabel("nats per token")
        ax.set_title(title)
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(figures_dir / "loss_curves.png", dpi=120)
    plt.close(fig)


def run_build(cfg) -> "pandas.DataFrame":
    """The whole pipeline for a config with the keys of configs/zoo/build.yaml."""
    import pandas as pd

    from experiments.zoo import world as W
    from experiments.zoo.queries import checkpoint_selection_queries, competence_queries
    from experiments.zoo.tokenizer import build_tokenizer
    from experiments.zoo.train import SIZES, TrainResult

    root = (REPO_ROOT / cfg["artifacts_root"]).resolve()
    preset = cfg["world_preset"]
    started = time.perf_counter()
    dataset_path, _, queries = build_world_and_queries(preset, root / "world" / preset, seed=cfg["seed"])
    tokenizer_path = build_tokenizer(dataset_path, root / "tokenizer" / preset, vocab_size=cfg["vocab_size"])
    unknown = [s for s in cfg["sizes"] if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown model sizes {unknown}; choose from {sorted(SIZES)}")
    config = W.world_config(preset, seed=cfg["seed"])
    sets = query_sets(queries, competence_queries(config), competence_queries(config, queried_only=False))
    # largest first, so the longest jobs start first and the workers finish together
    jobs = [{"size": size, "seed": int(seed), "train": dict(cfg["train"]), "tokenizer_path": str(tokenizer_path),
             "dataset_path": str(dataset_path), "out_dir": str(root / "zoo" / size / f"seed{seed}"), "sets": sets,
             "selection": checkpoint_selection_queries(config) if cfg.get("select_checkpoint", True) else None}
            for size in sorted(cfg["sizes"], key=lambda s: -SIZES[s].hidden_size) for seed in cfg["seeds"]]
    workers = max(1, min(int(cfg["workers"]), len(jobs)))
    if workers == 1:
        outputs = [_train_and_evaluate(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            outputs = list(pool.map(_train_and_evaluate, jobs))
    order = {s: i for i, s in enumerate(cfg["sizes"])}
    outputs.sort(key=lambda o: (order[o["row"]["size"]], o["row"]["seed"]))
    results = [TrainResult(**o["result"]) for o in outputs]
    summary = pd.DataFrame([o["row"] for o in outputs])
    bar = dict(cfg["competence_bar"])
    verdict = competence_verdict(summary, bar)
    n_distractors = max((len(q.distractors) for q in sets["competence"]), default=9)
    write_figures(summary, results, REPO_ROOT / cfg["figures_dir"], 1 / (1 + n_distractors), verdict, bar)
    (root / "zoo" / "manifest.json").write_text(json.dumps({
        "config": cfg, "results": [dataclasses.asdict(r) for r in results], "competence": verdict,
        "build_seconds": round(time.perf_counter() - started, 1)}, indent=1, default=str))
    print(summary.to_string(index=False), flush=True)
    print(f"[zoo] competence bar {bar}: {verdict}", flush=True)
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
