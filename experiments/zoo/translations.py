"""Korean and Turkish versions of every English document of a zoo world, for the cross-lingual study.

    python -m experiments.zoo.translations artifacts/world/full/dataset     # -> artifacts/world/full/translations.jsonl

Every document of world v2 is a list of sentence structures (template id, slot values, fact), so its Korean and
Turkish versions are rendered from the same structure (``world.render_row``): each sentence in the other language's
template of the same meaning (a fact in the same word order; prose, math, code docstrings, dialogue turns, fiction
and essays by their hand-written translations), names in Hangul / Turkish spelling, numbers and code identifiers
unchanged. So any top sequence of any query has a translation, with the same facts in the same order.

The file is what experiments/translation.FileTranslator reads: one JSON object per line,
{"text": <English source>, "ko": ..., "tr": ..., "doc_id": ..., "note": ...}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from experiments.zoo import world as W

LANGUAGES = ("ko", "tr")
NOTE = ("zoo world v2: rendered from the document's sentence structure with the world's Korean/Turkish templates "
        "(same facts, same word order; names in Hangul / Turkish spelling)")


@dataclass(frozen=True)
class ZooTranslations:
    path: Path
    rendered: int  # English documents with a rendering (all of them)
    untranslatable: list[dict]  # {"doc_id", "family", "reason"}: empty for a v2 world


def render_translations(documents: Iterable[Mapping], facts: Sequence[W.Fact] = ()) -> tuple[list[dict], list[dict]]:
    """Rows for FileTranslator, one per English document (with its sentence records), and the list of documents
    that could not be rendered (a row without sentence records, e.g. from a world v1 dataset). A text that occurs
    twice is written once (FileTranslator looks translations up by the source text)."""
    rows, untranslatable, seen = [], [], set()
    for doc in documents:
        if doc.get("language", "en") != "en" or doc["text"] in seen:
            continue
        seen.add(doc["text"])
        row = {"text": doc["text"], "doc_id": doc.get("doc_id")}
        if not doc.get("sentences"):
            reason = "no sentence records (not a world v2 document): nothing to render from"
            rows.append({**row, "ko": None, "tr": None, "untranslatable": reason})
            untranslatable.append({"doc_id": doc.get("doc_id"), "family": doc.get("family"), "reason": reason})
            continue
        rows.append({**row, **{language: W.render_row(doc, language) for language in LANGUAGES}, "note": NOTE})
    return rows, untranslatable


def write_translations(dataset_path: str | Path, out: str | Path | None = None,
                       splits: Sequence[str] = ("train", "validation")) -> ZooTranslations:
    """Render every English document of a saved world's splits; out defaults to <world>/translations.jsonl."""
    import datasets

    dataset_path = Path(dataset_path)
    world = datasets.load_from_disk(str(dataset_path))
    documents = [row for split in splits if split in world for row in world[split]]
    rows, untranslatable = render_translations(documents)
    path = Path(out) if out else dataset_path.parent / "translations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return ZooTranslations(path, len(rows) - len(untranslatable), untranslatable)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a saved world's dataset folder (artifacts/world/full/dataset)")
    parser.add_argument("--out", help="the jsonl to write (default: translations.jsonl beside the dataset)")
    parser.add_argument("--split", action="append", help="splits to render (default: train and validation)")
    args = parser.parse_args(argv)
    result = write_translations(args.dataset, args.out, args.split or ("train", "validation"))
    print(f"{result.path}: {result.rendered} English documents rendered in Korean and Turkish, "
          f"{len(result.untranslatable)} without sentence records")


if __name__ == "__main__":
    main()
