"""The result contract: every run (a `score` run or a study) writes `study.json` beside its tables.

    run_dir/
      study.json            what ran, on what, and what it found (this module)
      <table>.csv / .parquet / .md   named in study.json["tables"]
      <figure>.png / .pdf            named in study.json["figures"]

study.json keys:
    study      "score" or the study's name ("sparsity", ...)
    models     [{name, path, architecture, non_embedding_parameters, seed}]
    corpus     {path, fingerprint, columns, num_sequences}
    queries    [query names]
    settings   the resolved config
    tables     {name: file, relative to run_dir}; every run has "queries" (name, prompt, completion) and
               "top_sequences" (.jsonl: model, query, rank, train_id, influence, text, tokens, token_scores, layer:<name>...)
    figures    {name: file, relative to run_dir}
    verdicts   [{claim, statistic, estimate, ci_low, ci_high, p_value, n_models, n_seeds, verdict, ...}]
    paper      {name: the paper's section/figure this run's output mirrors}
    command, created, versions, artifacts (where factors and score shards live)

The report and `make figures` read this file; nothing parses README.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STUDY_FILE = "study.json"
VERDICTS = ("holds", "does not hold", "underpowered", "inconclusive")
VERDICT_KEYS = ("claim", "statistic", "estimate", "ci_low", "ci_high", "p_value", "n_models", "n_seeds", "verdict")


class ResultContractError(ValueError):
    """A study.json that does not follow the contract (missing key, unknown verdict, a verdict without evidence)."""


@dataclass
class ModelRecord:
    name: str
    path: str
    architecture: str  # e.g. "GPTNeoXForCausalLM"
    non_embedding_parameters: int
    seed: int | None = None  # training seed, where known


@dataclass
class CorpusRecord:
    path: str
    fingerprint: str  # the datasets fingerprint of the loaded split
    columns: list[str]
    num_sequences: int


@dataclass
class StudyRecord:
    study: str
    models: list[ModelRecord]
    corpus: CorpusRecord
    queries: list[str]
    settings: dict
    tables: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    verdicts: list[dict] = field(default_factory=list)
    paper: dict[str, str] = field(default_factory=dict)
    command: str = ""
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> {"factors": dir, "scores": dir}
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "study.json") -> "StudyRecord":
        missing = [k for k in ("study", "models", "corpus", "queries", "settings", "tables", "figures", "verdicts")
                   if k not in d]
        if missing:
            raise ResultContractError(f"{source} lacks {missing}; rerun the command that made it")
        known = {f for f in cls.__dataclass_fields__}
        record = cls(**{k: v for k, v in d.items() if k in known})
        record.models = [m if isinstance(m, ModelRecord) else ModelRecord(**m) for m in record.models]
        record.corpus = record.corpus if isinstance(record.corpus, CorpusRecord) else CorpusRecord(**record.corpus)
        for row in record.verdicts:
            check_verdict(row, source)
        return record


def verdict_row(claim: str, statistic: str, estimate: float | None, verdict: str, *, ci_low: float | None = None,
                ci_high: float | None = None, p_value: float | None = None, n_models: int, n_seeds: int,
                **extra) -> dict:
    """One verdict in the contract's shape; refuses a verdict the row's own numbers cannot support."""
    row = {"claim": claim, "statistic": statistic, "estimate": _number(estimate), "ci_low": _number(ci_low),
           "ci_high": _number(ci_high), "p_value": _number(p_value), "n_models": int(n_models),
           "n_seeds": int(n_seeds), "verdict": verdict, **extra}
    check_verdict(row)
    return row


def check_verdict(row: dict, source: str = "verdict") -> None:
    """A row has every contract key, a known verdict, and a CI or p-value behind 'holds' / 'does not hold'."""
    missing = [k for k in VERDICT_KEYS if k not in row]
    if missing:
        raise ResultContractError(f"{source}: verdict row {row.get('claim', '?')!r} lacks {missing}")
    if row["verdict"] not in VERDICTS:
        raise ResultContractError(f"{source}: verdict {row['verdict']!r} is not one of {list(VERDICTS)}")
    if row["verdict"] in ("holds", "does not hold") and row["p_value"] is None and (
            row["ci_low"] is None or row["ci_high"] is None):
        raise ResultContractError(f"{source}: {row['claim']!r} is called {row['verdict']!r} without a CI or p-value; "
                                  "give one, or call it 'inconclusive'")


def _number(value) -> float | None:
    """JSON-safe float: None for missing, NaN or infinite values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def write_rows(frame, path: str | Path) -> Path:
    """A table with list cells (tokens, token scores) as JSON lines: text, so committed results can hold it."""
    path = Path(path)
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def read_rows(path: str | Path, columns: list[str] | None = None, model: str | None = None):
    """A table written by write_rows (.jsonl) or as parquet; `model` keeps that model's rows only."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path, columns=columns, filters=[("model", "==", model)] if model else None)
    elif path.suffix == ".jsonl":
        frame = pd.read_json(path, orient="records", lines=True, dtype=False)
        frame = frame[frame["model"] == model] if model else frame
        frame = frame[columns] if columns else frame
    else:
        raise ResultContractError(f"{path}: a row table is .jsonl or .parquet, not {path.suffix!r}")
    return frame.reset_index(drop=True)


def write_study(run_dir: str | Path, record: StudyRecord) -> Path:
    """run_dir/study.json, written atomically; every table and figure it names must exist."""
    run_dir = Path(run_dir)
    for kind in ("tables", "figures"):
        absent = [f for f in getattr(record, kind).values() if not (run_dir / f).exists()]
        if absent:
            raise ResultContractError(f"study.json would name {kind} missing from {run_dir}: {absent}")
    for row in record.verdicts:
        check_verdict(row)
    import torch
    import transformers

    record.created = record.created or time.strftime("%Y-%m-%d %H:%M:%S")
    record.versions = record.versions or {"torch": torch.__version__, "transformers": transformers.__version__,
                                          "python": platform.python_version()}
    path = run_dir / STUDY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_study(run_dir: str | Path) -> StudyRecord:
    """The study.json of a run folder, checked against the contract; errors name the file and the fix."""
    path = Path(run_dir) / STUDY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {STUDY_FILE} in {run_dir}: it is not a finished run folder "
                                "(run `influence-lab score ...` or a study first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResultContractError(f"{path} is not valid JSON ({error}); delete it and rerun the command") from error
    return StudyRecord.from_dict(data, str(path))
