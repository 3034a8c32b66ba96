"""The main job on the built-in default: which training sequences made the micro model say this?

    python -m experiments.demo                       # EK-FAC, 3 word-order queries, top 5 sequences each
    python -m experiments.demo influence=kfac top_k=10 query_study=facts

Builds (once, cached under artifacts/) the micro world and a 2-layer GPT-NeoX, loads them back with
`from_pretrained` / `load_from_disk`, fits EK-FAC factors on the MLP layers, scores every training sequence,
prints the top sequences per query with the token that carries most of the influence, and saves scores,
the table and the resolved config in the run folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from experiments import pipeline
from experiments.loading import model_max_length
from experiments.results import StudyRecord, write_rows, write_study
from experiments.zoo.micro import build_micro_zoo
from experiments.zoo.queries import select

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def highlighted(tokens, token_scores, max_chars: int = 400) -> Text:
    """The sequence's decoded pieces shaded red (positive influence) or teal (negative), as in the paper's figures."""
    scale = max(abs(v) for v in token_scores) or 1.0
    out = Text()
    for piece, value in zip(tokens, token_scores):
        strength = abs(value) / scale
        colour = "red" if value > 0 else "cyan"
        out.append(piece, style=(f"bold {colour}" if strength > 0.5 else colour) if strength > 0.15 else None)
        if len(out) > max_chars:
            out.append(" ...")
            break
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    """The micro zoo through the one pipeline (as `influence-lab score`), printed with token shading."""
    console = Console(width=None if Console().is_terminal else 140)
    zoo = build_micro_zoo(Path(cfg.micro_zoo))
    chosen = select(zoo.queries, cfg.query_study)[: cfg.num_queries]
    if not chosen:
        studies = sorted({q.study for q in zoo.queries})
        raise ValueError(f"no queries for query_study={cfg.query_study!r}; choose one of {studies}")
    if len(chosen) < cfg.num_queries:
        print(f"demo: {len(chosen)} queries for query_study={cfg.query_study!r} (num_queries={cfg.num_queries})")
    loaded = pipeline.load_model("micro", zoo.model_path)
    corpus = pipeline.load_corpus(zoo.dataset_path, loaded.tokenizer, model_max_length(loaded.model), truncation=True)
    scoring = pipeline.ScoringSettings(query_rank=None, top_k_tokens=cfg.top_k)
    scores = pipeline.score_model(loaded, corpus, chosen, cfg.influence, scoring, cfg.artifacts)
    table = pipeline.top_sequences(scores, corpus, cfg.top_k)

    for query in chosen:
        console.rule(f"Query: {query.name}")
        console.print(Text("Prompt: ", style="bold") + Text(query.prompt))
        console.print(Text("Completion: ", style="bold") + Text(query.completion))
        view = Table(show_lines=True, expand=True)
        view.add_column("rank", width=4)
        view.add_column("influence", width=9)
        view.add_column("doc / family / topic", width=18)
        view.add_column("sequence (red: raises log p(completion), teal: lowers it)", ratio=1)
        for row in table[table["query"] == query.name].itertuples():
            view.add_row(str(row.rank), f"{row.influence:.4g}", f"{row.doc_id}\n{row.family} / {row.topic}",
                         highlighted(row.tokens, row.token_scores))
        console.print(view)

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.queries_table(chosen).to_csv(out_dir / "queries.csv", index=False)
    write_rows(table, out_dir / "top_sequences.jsonl")
    table.drop(columns=["tokens", "token_scores"]).to_csv(out_dir / "top_sequences.csv", index=False)
    write_study(out_dir, StudyRecord(
        study="demo", models=[loaded.record()], corpus=corpus.record(), queries=[q.name for q in chosen],
        settings=OmegaConf.to_container(cfg, resolve=True),
        tables={"queries": "queries.csv", "top_sequences": "top_sequences.jsonl",
                "top_sequences_readable": "top_sequences.csv"},
        command="python -m experiments.demo " + " ".join(HydraConfig.get().overrides.task),
        artifacts={"micro": {"factors": str(scores.factors_dir), "scores": str(scores.scores_dir)}}))
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in scores.timings_s.items())
    console.print(f"[bold]{len(chosen)} queries x {len(corpus)} training sequences[/] ({timing}). Saved to {out_dir}"
                  f"\nreport: influence-lab report {out_dir}")


if __name__ == "__main__":
    main()
