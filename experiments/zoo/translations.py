"""Korean and Turkish renderings of the zoo's English training documents, for the cross-lingual study.

    python -m experiments.zoo.translations artifacts/world/full/dataset     # -> artifacts/world/full/translations.jsonl

World v1 cannot translate a document: it has Korean and Turkish only for its facts (KOREAN_TEMPLATES,
TURKISH_TEMPLATES, written by hand) and unrelated Korean/Turkish filler prose. What it can render from the same
structured content is a document's fact statements. The rendering of an English `fact` or `word_order`
document is therefore:

    each English statement of one of its facts (an exact FORWARD_TEMPLATES / FLIPPED_TEMPLATES sentence, in text
    order) -> the world's statement of that fact in the other language, in the same word order (subject first:
    template 0; object first: template 1), joined by spaces; the English filler prose is dropped (no rendering).

So a rendering is "the document's facts in Korean/Turkish", shorter than the English document, not a translation
of its text. Every other English document (math, code, role-play, filler, or a fact document whose statement is
not found) is written as untranslatable, with the reason. World v2 adds sentence-level re-rendering.

The file is what experiments/translation.FileTranslator reads: one JSON object per line,
{"text": <English source>, "ko": ..., "tr": ..., "doc_id": ..., "note": ...}, with "ko"/"tr" null and an
"untranslatable" reason for the documents that have no rendering.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from experiments.zoo import world as W

LANGUAGES = ("ko", "tr")
RENDERED_FAMILIES = ("fact", "word_order")
NOTE = ("zoo world v1: the document's fact statements rendered with the world's Korean/Turkish templates in the "
        "same word order; its English prose is not translated (dropped)")


@dataclass(frozen=True)
class ZooTranslations:
    path: Path
    rendered: int  # English documents with a rendering
    untranslatable: list[dict]  # {"doc_id", "family", "reason"} of the English documents without one


def _statements(fact: W.Fact) -> list[tuple[str, str]]:
    """(English sentence, order) for every training template of the fact."""
    return [(t.format(**fact.slots), order) for order, table in (("forward", W.FORWARD_TEMPLATES),
                                                                 ("flipped", W.FLIPPED_TEMPLATES))
            for t in table[fact.relation]]


def fact_statements(text: str, facts: Sequence[W.Fact]) -> list[tuple[int, W.Fact, str]]:
    """The facts' English statements found in text: (position, fact, order), in text order, non-overlapping (the
    longest statement wins where two start at one place)."""
    found = []
    for fact in facts:
        for sentence, order in _statements(fact):
            start = text.find(sentence)
            while start >= 0:
                found.append((start, start + len(sentence), fact, order))
                start = text.find(sentence, start + 1)
    found.sort(key=lambda m: (m[0], -(m[1] - m[0])))
    kept, end = [], -1
    for start, stop, fact, order in found:
        if start >= end:
            kept.append((start, fact, order))
            end = stop
    return kept


def render_statement(fact: W.Fact, order: str, language: str) -> str:
    """The world's statement of a fact in Korean or Turkish: template 0 puts the subject first, template 1 the object."""
    templates = (W.KOREAN_TEMPLATES if language == "ko" else W.TURKISH_TEMPLATES)[fact.relation]
    return templates[0 if order == "forward" else 1].format(s=fact.subject, o=W._ko_tr_object(fact, language))


def render_document(doc: Mapping, facts_by_id: Mapping[str, W.Fact]) -> dict:
    """{"ko": ..., "tr": ...} for an English document with a rendering, else {"untranslatable": reason}."""
    if doc.get("language", "en") != "en":
        return {"untranslatable": f"not English (language {doc.get('language')!r})"}
    if doc.get("family") not in RENDERED_FAMILIES:
        return {"untranslatable": f"family {doc.get('family')!r}: world v1 has no Korean/Turkish rendering of it"}
    facts = [facts_by_id[f] for f in doc.get("fact_ids") or []]
    found = fact_statements(doc["text"], facts)
    missing = sorted({f.fact_id for f in facts} - {fact.fact_id for _, fact, _ in found})
    if not facts or missing:
        return {"untranslatable": f"no statement found in the text for facts {missing or '(none listed)'}"}
    return {language: " ".join(render_statement(fact, order, language) for _, fact, order in found)
            for language in LANGUAGES}


def render_translations(documents: Iterable[Mapping], facts: Sequence[W.Fact]) -> tuple[list[dict], list[dict]]:
    """Rows for FileTranslator (every English document: rendered, or with ko/tr null and the reason) and the list
    of untranslatable English documents ({"doc_id", "family", "reason"})."""
    facts_by_id = {f.fact_id: f for f in facts}
    rows, untranslatable = [], []
    for doc in documents:
        if doc.get("language", "en") != "en":
            continue
        rendering = render_document(doc, facts_by_id)
        row = {"text": doc["text"], "doc_id": doc.get("doc_id"), "ko": rendering.get("ko"), "tr": rendering.get("tr")}
        if "untranslatable" in rendering:
            row["untranslatable"] = rendering["untranslatable"]
            untranslatable.append({"doc_id": doc.get("doc_id"), "family": doc.get("family"),
                                   "reason": rendering["untranslatable"]})
        else:
            row["note"] = NOTE
        rows.append(row)
    return rows, untranslatable


def load_facts(dataset_path: str | Path) -> list[W.Fact]:
    """facts.json beside a saved world's dataset folder (written by world.save_world)."""
    path = Path(dataset_path).parent / "facts.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; build the world with `make zoo` (world.save_world writes it)")
    return [W.Fact(**f) for f in json.loads(path.read_text())]


def write_translations(dataset_path: str | Path, out: str | Path | None = None, split: str = "train") -> ZooTranslations:
    """Render every English document of a saved world's split; out defaults to <world>/translations.jsonl."""
    import datasets

    dataset_path = Path(dataset_path)
    documents = datasets.load_from_disk(str(dataset_path))[split]
    rows, untranslatable = render_translations(documents, load_facts(dataset_path))
    path = Path(out) if out else dataset_path.parent / "translations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return ZooTranslations(path, len(rows) - len(untranslatable), untranslatable)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a saved world's dataset folder (artifacts/world/full/dataset)")
    parser.add_argument("--out", help="the jsonl to write (default: translations.jsonl beside the dataset)")
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    result = write_translations(args.dataset, args.out, args.split)
    families: dict[str, int] = {}
    for row in result.untranslatable:
        families[row["family"]] = families.get(row["family"], 0) + 1
    print(f"{result.path}: {result.rendered} English documents rendered (facts only), "
          f"{len(result.untranslatable)} untranslatable {families}")


if __name__ == "__main__":
    main()
