"""Probe sequences of the word-order study (paper Sec 5.3.4, Figs 24-25): candidate training sequences, not in the
training set, scored against a query with the training corpus's factors.

A probe file (configs/probes/*.yaml) lists, per query, its probes in the paper's six groups:

    queries:
      - query: first_president_astrobia          # a query name of the study's query file
        prompt: "The first President of the Republic of Astrobia was"   # optional; checked against the query file
        completion: " Zorald Pfaff"                                     # optional; checked likewise
        source: "..."                                                   # documentary
        groups:
          - group: rewordings                    # one of GROUPS, each exactly once per query
            sequences: ["The first President of the Republic of Astrobia was Zorald Pfaff", ...]
          - group: name_removed
            text_found: false                    # a group whose texts are not available: sequences: null
            sequences: null
            note: "..."

Groups (the paper's partitions, in its order): 1 rewordings (the completion after the rest, meaning kept);
2 name_removed (the completion removed); 3 meaning_changed (another name, "King", another country);
4 irrelevant; 5 order_flipped (the completion before the rest); 6 flipped_relation_removed (flipped, with the
rest of the relation removed, e.g. "Zorald Pfaff").
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from experiments.queries import Query
from experiments.records import read_records

GROUPS = ("rewordings", "name_removed", "meaning_changed", "irrelevant", "order_flipped", "flipped_relation_removed")
GROUP_LABELS = {  # bar labels of the figure
    "rewordings": "1 rewordings",
    "name_removed": "2 completion removed",
    "meaning_changed": "3 meaning changed",
    "irrelevant": "4 irrelevant",
    "order_flipped": "5 order flipped",
    "flipped_relation_removed": "6 flipped, relation removed",
}
QUERY_KEYS = {"query", "prompt", "completion", "figure", "source", "note", "groups", "written_by"}
GROUP_KEYS = {"group", "partition", "caption", "text_found", "sequences", "note"}


class Probe(NamedTuple):
    """One probe sequence: the query it is scored against, its group (one of GROUPS) and its text."""

    query: str
    group: str
    text: str


def load_probe_file(path: str | Path, queries: Sequence[Query] | None = None) -> list[Probe]:
    """Probes from a probe file (.yaml, .json, or .jsonl: one {query, groups} per line), in file order; with
    `queries` (the study's query set), every probe query must be one of them, with the same prompt and
    completion where the file states them.

    Refused with a one-line error: a missing file, an entry without `query` or `groups`, an unknown or repeated
    group, a query lacking one of the six groups, an empty or non-text sequence, a group with no sequences that is
    not marked `text_found: false`, a query named twice, a query not in `queries`, a prompt/completion mismatch.
    Groups marked `text_found: false` are left out, and printed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"probe file {path} does not exist; give probe_file=FILE (see configs/probes/)")
    raw = read_records(path)  # .yaml, .json, or .jsonl (one {query, groups} entry per line)
    entries = raw.get("queries") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"probe file {path}: expected a non-empty 'queries' list of {{query, groups}}")
    by_name = {q.name: q for q in queries} if queries is not None else None
    probes: list[Probe] = []
    seen_queries: set[str] = set()
    missing_texts = []
    for entry in entries:
        name = entry.get("query") if isinstance(entry, dict) else None
        if not name or not isinstance(entry.get("groups"), list):
            raise ValueError(f"probe file {path}: every entry needs 'query' (a query name) and a 'groups' list; "
                             f"got {entry!r:.80}")
        unknown = sorted(set(entry) - QUERY_KEYS)
        if unknown:
            raise ValueError(f"probe file {path}: query {name!r} has unknown keys {unknown}; known: {sorted(QUERY_KEYS)}")
        if name in seen_queries:
            raise ValueError(f"probe file {path}: query {name!r} appears twice; give each query once")
        seen_queries.add(name)
        if by_name is not None:
            if name not in by_name:
                raise KeyError(f"probe file {path}: query {name!r} is not in the study's query set "
                               f"(it has {list(by_name)[:6]}...); add it to the query file (queries.path=...)")
            for key in ("prompt", "completion"):
                if key in entry and entry[key] != getattr(by_name[name], key):
                    raise ValueError(f"probe file {path}: query {name!r} has {key} {entry[key]!r} but the query "
                                     f"file has {getattr(by_name[name], key)!r}; make them agree")
        groups_seen: set[str] = set()
        for group_entry in entry["groups"]:
            group = group_entry.get("group") if isinstance(group_entry, dict) else None
            if group not in GROUPS:
                raise ValueError(f"probe file {path}: query {name!r} has group {group!r}; known: {list(GROUPS)}")
            if group in groups_seen:
                raise ValueError(f"probe file {path}: query {name!r} lists group {group!r} twice")
            groups_seen.add(group)
            unknown = sorted(set(group_entry) - GROUP_KEYS)
            if unknown:
                raise ValueError(f"probe file {path}: query {name!r}, group {group!r} has unknown keys {unknown}")
            sequences = group_entry.get("sequences")
            if group_entry.get("text_found") is False and not sequences:
                missing_texts.append(f"{name}/{group}")
                continue
            if not isinstance(sequences, list) or not sequences:
                raise ValueError(f"probe file {path}: query {name!r}, group {group!r} has no sequences; give at least "
                                 "one, or mark the group text_found: false with a note")
            for text in sequences:
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"probe file {path}: query {name!r}, group {group!r} has an empty or non-text "
                                     f"sequence {text!r}; give the probe's text")
                probes.append(Probe(name, group, text))
        absent = [g for g in GROUPS if g not in groups_seen]
        if absent:
            raise ValueError(f"probe file {path}: query {name!r} lacks groups {absent}; give all six (a group whose "
                             "texts are not available: text_found: false, sequences: null)")
    if missing_texts:
        print(f"probes: {len(missing_texts)} groups in {path} have no known texts and are left out: "
              f"{', '.join(missing_texts)}")
    return probes
