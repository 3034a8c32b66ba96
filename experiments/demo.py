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
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from experiments.common import config_digest, run_influence, save_run, top_sequences_table
from experiments.loading import load_model_and_tokenizer, load_text_dataset, model_max_length, tokenize_sequences
from experiments.zoo.micro import build_micro_zoo
from experiments.zoo.queries import select
from influence_core import Query

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def token_pieces(token_ids, token_scores, tokenizer) -> list[tuple[str, float]]:
    """Decoded text pieces with their influence; byte-level tokens that split a character are merged first."""
    pieces, buffer, score = [], [], 0.0
    for token_id, value in zip(token_ids, token_scores):
        buffer.append(int(token_id))
        score += float(value)
        text = tokenizer.decode(buffer)
        if not text.endswith("\ufffd"):
            pieces.append((text, score))
            buffer, score = [], 0.0
    if buffer:
        pieces.append((tokenizer.decode(buffer), score))
    return pieces


def highlighted(token_ids, token_scores, tokenizer, max_chars: int = 400) -> Text:
    """The sequence with tokens shaded red (positive influence) or teal (negative), as in the paper's figures."""
    pieces = token_pieces(token_ids, token_scores, tokenizer)
    scale = max(abs(v) for _, v in pieces) or 1.0
    out = Text()
    for piece, value in pieces:
        strength = abs(value) / scale
        colour = "red" if value > 0 else "cyan"
        out.append(piece, style=(f"bold {colour}" if strength > 0.5 else colour) if strength > 0.15 else None)
        if len(out) > max_chars:
            out.append(" ...")
            break
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    console = Console(width=None if Console().is_terminal else 140)
    zoo = build_micro_zoo(Path(cfg.micro_zoo))
    model, tokenizer = load_model_and_tokenizer(zoo.model_path)
    train = load_text_dataset(zoo.dataset_path, split="train")
    encoded = tokenize_sequences(train, tokenizer, max_length=model_max_length(model), truncation=True)
    encoded.pop("lengths")
    chosen = select(zoo.queries, cfg.query_study)[: cfg.num_queries]
    if not chosen:
        studies = sorted({q.study for q in zoo.queries})
        raise ValueError(f"no queries for query_study={cfg.query_study!r}; choose one of {studies}")
    queries = [Query(q.name, q.prompt, q.completion) for q in chosen]

    factors_dir = Path(cfg.artifacts) / "factors" / f"micro-{cfg.influence.strategy}-{config_digest(cfg.influence)}"
    run = run_influence(model, tokenizer, encoded, queries, cfg.influence, factors_dir, data_fingerprint=train._fingerprint)
    metadata = train.select_columns(["doc_id", "family", "topic", "language"]).to_pandas()
    table = top_sequences_table(run, metadata, tokenizer, cfg.top_k)

    for q_index, query in enumerate(queries):
        console.rule(f"Query: {query.name}")
        console.print(Text("Prompt: ", style="bold") + Text(query.prompt))
        console.print(Text("Completion: ", style="bold") + Text(query.completion))
        view = Table(show_lines=True, expand=True)
        view.add_column("rank", width=4)
        view.add_column("influence", width=9)
        view.add_column("doc / family / topic", width=18)
        view.add_column("sequence (red: raises log p(completion), teal: lowers it)", ratio=1)
        for row in table[table["query"] == query.name].itertuples():
            n = row.train_index
            length = int(run.train_attention_mask[n].sum())
            view.add_row(str(row.rank), f"{row.influence:.4g}", f"{row.doc_id}\n{row.family} / {row.topic}",
                         highlighted(run.train_input_ids[n, :length], run.scores.per_token[q_index, n, :length], tokenizer))
        console.print(view)

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    save_run(run, out_dir, cfg, extra={"model": str(zoo.model_path), "factors_dir": str(factors_dir)})
    table.to_csv(out_dir / "top_sequences.csv", index=False)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in run.timings_s.items())
    console.print(f"[bold]{len(queries)} queries x {len(train)} training sequences[/] ({timing}). Saved to {out_dir}")


if __name__ == "__main__":
    main()
