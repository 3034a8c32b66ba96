"""`influence-lab`: the console command over the same functions the Hydra apps call.

    influence-lab score --model PATH --data PATH --queries PATH          # your model, corpus and queries
    influence-lab score --micro-zoo                                       # the built-in micro example
    influence-lab study sparsity --model PATH --data PATH --queries PATH  # a study on your model and corpus
    influence-lab report RUN_DIR [RUN_DIR ...]                            # the HTML report of finished runs
    influence-lab plan pythia-410m --budget-gib 80                        # peak memory from the config alone
    influence-lab index build --model PATH --data PATH --out INDEX        # every sequence's gradient, compressed
    influence-lab index query --index INDEX --queries PATH                # new queries from the index, re-ranked

Anything after the options is passed on as Hydra overrides (`influence.strategy=kfac tfidf.top_k=1000`);
the Hydra apps (`python -m experiments.score ...`, `python -m experiments.sparsity -m ...`) stay for sweeps.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

STUDIES = ("sparsity", "layerwise", "word_order", "scale", "crosslingual", "math_code", "roleplay", "memorisation")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def input_overrides(args: argparse.Namespace) -> list[str]:
    """The shared input options -> Hydra overrides of the score config (model, data, queries groups)."""
    out = []
    for flag, key in (("model", "model.name_or_path"), ("data", "data.path"), ("queries", "queries.path"),
                      ("name", "model.name"), ("text_column", "data.text_column"), ("split", "data.split"),
                      ("max_length", "data.max_length"), ("dtype", "model.dtype"), ("device", "model.device")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "truncate", False):
        out.append("data.truncation=true")
    return out


def add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (save_pretrained) or a hub name in the local cache")
    parser.add_argument("--data", help="corpus: .jsonl/.json/.parquet/.csv/.txt file, a folder of them, or a "
                                       "save_to_disk folder; only a text column is required")
    parser.add_argument("--queries", help=".json/.jsonl/.yaml list of {name, prompt, completion}")
    parser.add_argument("--name", help="the model's name in tables and caches (default: its folder's name)")
    parser.add_argument("--text-column", help="the corpus's text column (default: text)")
    parser.add_argument("--split", help="the corpus split (default: train)")
    parser.add_argument("--max-length", type=int, help="longest sequence in tokens (default: the model's context)")
    parser.add_argument("--truncate", action="store_true", help="cut longer sequences instead of refusing them")
    parser.add_argument("--dtype", help="the model's weights dtype, in which forward and backward run: float32 | "
                                        "bfloat16 | float16 | auto (the checkpoint's); factors and scores are "
                                        "accumulated in float32 (default: float32)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N | auto (cuda where available, else cpu) (default: cpu)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. influence.strategy=kfac tfidf.top_k=1000")


def run_dir_for(kind: str, out: str | None) -> Path:
    return Path(out) if out else Path("outputs") / kind / time.strftime("%Y-%m-%d_%H-%M-%S")


def score_command(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from experiments import score

    overrides = input_overrides(args) + (["micro_zoo=true"] if args.micro_zoo else []) + list(args.overrides)
    cfg = compose("experiment/score", overrides)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.command = "influence-lab " + " ".join(shlex.quote(a) for a in argv)
    score.run(cfg, run_dir_for("score", args.out))


def study_overrides(args: argparse.Namespace) -> list[str]:
    """A study on your own model and corpus: one model, a plain text corpus, every query of the file."""
    if not args.model:
        return []
    missing = [flag for flag in ("data", "queries") if getattr(args, flag) is None]
    if missing:
        raise SystemExit(f"influence-lab study: --model needs --{' and --'.join(missing)} too")
    name = args.name or Path(args.model).name
    out = [f"models=[{name}]", f"+model_paths.{name}={args.model}", "data=text_files", f"data.path={args.data}",
           f"queries.path={args.queries}", "queries.names=null", "queries.held_out_order=0"]
    for flag, key in (("text_column", "data.text_column"), ("split", "data.split"), ("max_length", "data.max_length")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    if args.truncate:
        out.append("data.truncation=true")
    return out


def study_command(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from omegaconf import OmegaConf

    overrides = study_overrides(args) + (["figures_dir=null"] if not args.figures else []) + list(args.overrides)
    cfg = compose(f"experiment/{args.study}", overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.command = "influence-lab " + " ".join(shlex.quote(a) for a in argv)
    run_dir = run_dir_for(args.study, args.out)
    importlib.import_module(f"experiments.{args.study}").run(cfg, run_dir)
    print(f"tables, figures and study.json: {run_dir}\nreport: influence-lab report {run_dir}")


def plan_command(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from experiments.model_shapes import meta_model
    from influence_core import track_layers
    from influence_core.memory import GIB, plan_memory, plan_output_blocks

    model = meta_model(args.model, args.dtype)
    layers = track_layers(model, list(args.patterns))
    settings = dict(queries=args.queries, query_rank=args.rank or None, factor_dtype=args.factor_dtype)
    budget = int(args.budget_gib * GIB)
    try:
        if args.output_blocks is None:
            plan = plan_output_blocks(layers, model, args.tokens, budget, **settings)
        else:
            plan = plan_memory(layers, model, args.tokens, budget=budget, output_blocks=args.output_blocks, **settings)
    except ValueError as error:
        raise SystemExit(f"influence-lab plan: {error}") from None
    print(f"{args.model} ({type(model).__name__}, {args.dtype}), {args.tokens} tokens, {args.queries} queries at "
          f"rank {args.rank or 'full'}, factors in {args.factor_dtype}")
    print(plan.table())
    if args.output_blocks is None and plan.output_blocks is not None:
        whole = plan_memory(layers, model, args.tokens, batch_size=1, **settings)
        print(f"without output blocks one sequence needs {whole.peak / GIB:.2f} GiB > {args.budget_gib:g} GiB; with "
              f"{plan.output_blocks} output blocks (influence.output_blocks={plan.output_blocks}: S block-diagonal, "
              f"correction and scoring per block) the peak is {plan.peak / GIB:.2f} GiB at batch {plan.batch_size}")


def index_command(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from experiments import index
    from influence_core.index import IndexArguments

    if args.index_command == "query":
        if args.overrides:
            raise SystemExit(f"influence-lab index query: unexpected arguments {args.overrides}")
        index.query(args.index, args.queries, args.rerank, args.top_k, args.out)
        return
    overrides = input_overrides(args) + (["micro_zoo=true"] if args.micro_zoo else []) + list(args.overrides)
    cfg = compose("experiment/score", overrides)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    dim = None if args.dim == 0 else args.dim
    index.build(cfg, IndexArguments(projection=args.projection, output_dim=dim, input_dim=dim,
                                    shard_size=args.shard_size, batch_size=cfg.influence.score_batch_size,
                                    dtype=args.storage_dtype, seed=args.seed), args.out or run_dir_for("index", None))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="influence-lab", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score a query set over your corpus with your model",
                                description="Fit EK-FAC factors, score every query over the corpus in resumable "
                                            "shards, write queries.csv, top_sequences.parquet and study.json.")
    add_input_options(score)
    score.add_argument("--micro-zoo", action="store_true", help="score the built-in micro example (no paths)")
    score.add_argument("--out", help="run folder (default: outputs/score/<time>)")

    study = commands.add_parser("study", help="run one of the paper's studies",
                                description="Run a study on the zoo (its config's models) or, with --model, "
                                            "--data and --queries, on your own model and a plain text corpus.")
    study.add_argument("study", choices=STUDIES)
    add_input_options(study)
    study.add_argument("--out", help="run folder (default: outputs/<study>/<time>)")
    study.add_argument("--figures", action="store_true", help="also write into the study's figures_dir")

    plan = commands.add_parser("plan", help="peak memory of fitting and scoring for a model, from its config alone",
                               description="Builds the model on the meta device (no weights) from a known name "
                                           "(pythia-70m ... pythia-12b, gpt2 ..., llama-3-8b) or a folder with "
                                           "config.json, and prints per tracked layer and stage the estimated "
                                           "bytes (influence_core/memory.py) and the largest batch that fits.")
    plan.add_argument("model", help="a known model name or a folder with config.json")
    plan.add_argument("--tokens", type=int, default=512, help="tokens per sequence (paper: 512)")
    plan.add_argument("--queries", type=int, default=32, help="queries scored together")
    plan.add_argument("--rank", type=int, default=32, help="query rank (0: full rank)")
    plan.add_argument("--budget-gib", type=float, default=80.0, help="memory budget in GiB")
    plan.add_argument("--dtype", default="bfloat16", help="the model's dtype (default: bfloat16)")
    plan.add_argument("--factor-dtype", default="float32", help="factor dtype: float32 or float64")
    plan.add_argument("--patterns", nargs="+", default=["*mlp*"], help="tracked module globs (default: *mlp*)")
    plan.add_argument("--output-blocks", type=int, help="split S into this many output blocks (default: none when "
                                                        "the factors fit, else the fewest that fit)")

    index = commands.add_parser("index", help="a compressed gradient index: build once, answer new queries from it",
                                description="build: every training sequence's gradient, compressed per layer "
                                            "(influence_core/index.py), in resumable shards; query: new queries "
                                            "over all sequences from the index, re-ranked by exact EK-FAC.")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="fit (or reuse) the factors, then store every sequence's gradient")
    add_input_options(build)
    build.add_argument("--micro-zoo", action="store_true", help="index the built-in micro example (no paths)")
    build.add_argument("--out", help="index folder; a rerun into it finishes a killed build (default: outputs/index/<time>)")
    build.add_argument("--projection", default="eigen", choices=["eigen", "random"],
                       help="eigen: each layer's top EK-FAC eigendirections (exact preconditioning on them); random: "
                            "Gaussian projections as in LoGra (default: eigen)")
    build.add_argument("--dim", type=int, default=32, help="kept output and input directions per layer (0: all, exact)")
    build.add_argument("--shard-size", type=int, default=4096, help="sequences per shard file")
    build.add_argument("--storage-dtype", default="float32", choices=["float16", "float32", "float64"])
    build.add_argument("--seed", type=int, default=0, help="of the random projection")
    ask = index_commands.add_parser("query", help="answer a query file from an index")
    ask.add_argument("--index", required=True, help="an index folder made by `influence-lab index build`")
    ask.add_argument("--queries", required=True, help=".json/.jsonl/.yaml list of {name, prompt, completion}")
    ask.add_argument("--rerank", type=int, default=500, help="rows per query re-scored by exact EK-FAC (0: index only, "
                                                             "the corpus is not read)")
    ask.add_argument("--top-k", type=int, default=10, help="rows per query in top_sequences.csv")
    ask.add_argument("--out", help="folder for top_sequences.csv (default: print only)")

    report = commands.add_parser("report", help="the HTML report of finished runs (folders with study.json)",
                                 add_help=False)
    report.add_argument("report_args", nargs=argparse.REMAINDER)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from experiments import report

        report.main(argv[1:])
        return
    top = parser()
    args, unknown = top.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u or args.command == "plan" or
             getattr(args, "index_command", None) == "query"]
    if stray:
        top.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + unknown  # Hydra overrides may follow the options
    {"score": score_command, "study": study_command, "plan": plan_command, "index": index_command}[args.command](args, argv)


if __name__ == "__main__":
    main()
