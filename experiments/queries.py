"""The one query type of the apps, and the loader of query files.

A query is a measurement f = log p(completion | prompt). A plain query file needs only name, prompt and
completion; every other field is optional metadata (the synthetic world fills them; a user's file need not):

    [{"name": "water", "prompt": "Water is composed of", "completion": " hydrogen and oxygen."}]   # .json
    {"name": "water", "prompt": "Water is composed of", "completion": " hydrogen and oxygen."}     # .jsonl, per line
    queries: [{name: water, prompt: "Water is composed of", completion: " hydrogen and oxygen."}]  # .yaml (or a list)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from experiments.records import read_records

QUERY_FILE_TYPES = (".json", ".jsonl", ".yaml", ".yml")
# Fields that document a query in a file (configs/queries/paper.yaml) without being part of the measurement.
DOCUMENTARY_FIELDS = ("source", "note", "category", "text_found", "whitespace_exact")


@dataclass(frozen=True)
class Query:
    """One influence query.

    name: unique, e.g. "water" or "fact_F0003_heldout".
    prompt, completion: text; completion usually starts with a space, and only its tokens are measured.
    study: optional label of what the query is for (the synthetic world's: facts, word_order, ...).
    The remaining fields are the synthetic world's metadata, empty for a plain query:
    fact_ids: facts the query asks about; relevant_doc_ids: training documents related by construction;
    relevant_topics: the ``topic`` values that define relevance for non-fact queries; language: the prompt's
    language; word_order: "forward", "flipped" or "none"; held_out: what the training data never contains
    ("template", "order", "numbers", "names" or ""); distractors: alternative completions for ranking accuracy.
    """

    name: str
    prompt: str
    completion: str
    study: str = ""
    fact_ids: tuple[str, ...] = ()
    relevant_doc_ids: tuple[str, ...] = ()
    relevant_topics: tuple[str, ...] = ()
    language: str = "en"
    word_order: str = "none"
    held_out: str = ""
    distractors: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "query") -> "Query":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "prompt", "completion") if d.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{source}: query {d.get('name', '?')!r} lacks {missing}; every query needs a name, "
                             "a prompt and a completion")
        unknown = sorted(set(d) - fields - set(DOCUMENTARY_FIELDS))
        if unknown:
            raise ValueError(f"{source}: query {d['name']!r} has unknown fields {unknown}; known: "
                             f"{sorted(fields | set(DOCUMENTARY_FIELDS))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def _read_rows(path: Path) -> list[dict]:
    raw = read_records(path)
    if isinstance(raw, dict) and "queries" in raw:
        raw = raw["queries"]
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of queries (or a mapping with a 'queries' list)")
    return raw


def load_query_file(path: str | Path, names: list[str] | None = None) -> list[Query]:
    """Queries from a .json (list), .jsonl (one per line) or .yaml file; `names` picks and orders a subset.

    Entries marked `text_found: false` (queries whose exact text no public source gives, see
    configs/queries/paper.yaml) cannot be scored: they are left out, and the names left out are printed.
    Refused with a one-line error: a missing file, an unknown suffix, a query without name, prompt or
    completion, duplicate names, an unknown name in `names`, and an empty result.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"query file {path} does not exist; give a .json, .jsonl or .yaml list of "
                                "{name, prompt, completion}")
    if path.suffix not in QUERY_FILE_TYPES:
        raise ValueError(f"query file {path}: unknown type {path.suffix!r}; use one of {list(QUERY_FILE_TYPES)}")
    rows = _read_rows(path)
    unavailable = [r.get("name", "?") for r in rows if r.get("text_found") is False]
    if unavailable:
        print(f"queries: {len(unavailable)} queries in {path} have no known exact text and are left out: "
              f"{', '.join(unavailable)}")
    queries = [Query.from_dict(r, str(path)) for r in rows if r.get("text_found") is not False]
    seen: set[str] = set()
    for q in queries:
        if q.name in seen:
            raise ValueError(f"{path}: query name {q.name!r} appears twice; names must be unique")
        seen.add(q.name)
        if not q.completion.strip():
            raise ValueError(f"query {q.name!r} has an empty completion; give at least one token")
    if names:
        by_name = {q.name: q for q in queries}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise KeyError(f"queries {unknown} are not in {path} (it has {list(by_name)[:8]}...)")
        queries = [by_name[n] for n in names]
    if not queries:
        raise ValueError(f"no queries to score in {path}")
    return queries
