"""The writer of the synthetic world: its sizes (``WorldConfig``), the documents as dataset rows, and the files.

    world = build_world(world_config("full"))     # datasets.DatasetDict(train, validation)
    save_world(world_config("full"), "artifacts/world/full")   # dataset/, facts.json, world_config.json

Every row is one document: ``text`` and the document's labels (family, topic, language, entities, fact_ids,
word_order) and ``sentences``, one record per sentence: {start, text, fact_id, relation, order, language,
template_id, role, entities, slots}, so a study sees what each sequence and each sentence is. ``render_row`` gives a
row's text in another language from the same structure (the cross-lingual study's translations).

The words and templates live in ``vocabulary``, the document generators in ``generators``. Generation is pure Python
with one ``random.Random(seed)``: the same config gives the same dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from experiments.zoo import generators as G
from experiments.zoo import vocabulary as V
from experiments.zoo.generators import FAMILIES, Document, Fact, Sentence, render  # noqa: F401  (public API)
from experiments.zoo.vocabulary import LANGUAGES, RELATIONS  # noqa: F401  (public API)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world: how many facts, and how many documents per fact and per family (train + validation).

    Few facts, each stated often and in many forms, so that small models learn them (zoo v1: 70 facts in ~38
    documents each, 10 English templates per relation: the models answered held-out paraphrases at 0.17-0.26).
    """

    seed: int = 0
    n_countries: int = 10  # each has a first President and a capital: 2 facts per country
    n_inventions: int = 10
    n_substances: int = 10
    flipped_only_per_relation: int = 2  # facts stated in training only in the flipped order
    queried_per_relation: int = 3  # facts the studies ask about (the rest get same-template controls)
    per_fact: dict = field(default_factory=lambda: {
        "fact": 28, "word_order": 6, "translation": 3, "name_only": 4, "control": 3})  # translation: per language
    per_family: dict = field(default_factory=lambda: {
        "math": 200, "code": 150, "roleplay": 300, "filler": 200, "memorisation": 10})  # memorisation: per passage
    validation_fraction: float = 0.05

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, WorldConfig] = {
    "micro": WorldConfig(
        n_countries=3, n_inventions=3, n_substances=3, flipped_only_per_relation=1, queried_per_relation=1,
        per_fact={"fact": 3, "word_order": 1, "translation": 1, "name_only": 1, "control": 1},
        per_family={"math": 12, "code": 10, "roleplay": 16, "filler": 10, "memorisation": 2},
        validation_fraction=0.1,
    ),
    "full": WorldConfig(),
}


def world_config(preset: str, **overrides) -> WorldConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def make_facts(config: WorldConfig) -> list[Fact]:
    """The world's facts (generators.make_facts with the config's sizes)."""
    return G.make_facts(config.n_countries, config.n_inventions, config.n_substances, config.flipped_only_per_relation,
                        config.queried_per_relation, config.seed)


def make_documents(config: WorldConfig) -> list[Document]:
    """All documents' structures, in a seeded shuffled order."""
    unknown = (set(config.per_fact) | set(config.per_family)) - set(FAMILIES)
    if unknown:
        raise ValueError(f"per_fact / per_family name unknown families {sorted(unknown)}; known: {FAMILIES}")
    rng = random.Random(config.seed)
    facts = make_facts(config)
    per_fact, per_family = config.per_fact, config.per_family
    docs: list[Document] = []
    # cycle through the facts so that every fact is stated equally often (distractors are as frequent as answers)
    for k in range(per_fact.get("fact", 0)):  # every third round: the fact's paraphrase in other words
        docs += [G.fact_document(rng, fact, facts, with_paraphrase=k % 3 == 0) for fact in facts]
    for _ in range(per_fact.get("word_order", 0)):
        docs += [G.word_order_document(rng, fact) for fact in facts]
    for _ in range(per_fact.get("translation", 0)):
        docs += [G.translation_document(rng, fact, language) for fact in facts for language in ("ko", "tr")]
    for _ in range(per_fact.get("name_only", 0)):
        docs += [G.name_only_document(rng, fact) for fact in facts]
    for _ in range(per_fact.get("control", 0)):
        docs += [G.control_document(rng, fact) for fact in facts if not fact.queried and fact.split == "both"]
    docs += [G.math_document(rng) for _ in range(per_family.get("math", 0))]
    docs += [G.code_document(rng) for _ in range(per_family.get("code", 0))]
    n_roleplay = per_family.get("roleplay", 0)
    docs += [G.roleplay_document(rng, V.ROLEPLAY_TOPICS[i % len(V.ROLEPLAY_TOPICS)]) for i in range(n_roleplay)]
    docs += [G.filler_document(rng) for _ in range(per_family.get("filler", 0))]
    for _ in range(per_family.get("memorisation", 0)):
        docs += [G.memorisation_document(rng, passage) for passage in V.PASSAGES]
    rng.shuffle(docs)
    return docs


COLUMNS = ("id", "doc_id", "text", "family", "topic", "language", "entities", "fact_ids", "word_order", "sentences")
SENTENCE_FIELDS = ("start", "text", "fact_id", "relation", "order", "language", "template_id", "role", "entities",
                   "slots")


def document_row(document: Document, language: str | None = None) -> dict:
    """A document as a dataset row (without id / doc_id), rendered in a language (default: its own)."""
    rendered = render(document, language)
    language = rendered["language"]
    entities = list(dict.fromkeys(e for s in rendered["sentences"] for e in s["entities"]))
    return {"text": rendered["text"], "family": document.family, "topic": document.topic, "language": language,
            "entities": entities, "fact_ids": document.fact_ids, "word_order": document.word_order,
            "sentences": rendered["sentences"]}


def generate_documents(config: WorldConfig) -> list[dict]:
    """All documents as rows with ids (position) and doc_ids (family-number, numbered in generation order)."""
    rows, counter = [], {}
    for i, document in enumerate(make_documents(config)):
        row = document_row(document)
        k = counter.get(row["family"], 0)
        counter[row["family"]] = k + 1
        rows.append({"id": i, "doc_id": f"{row['family']}-{k:04d}", **row})
    return rows


def row_document(row) -> Document:
    """A dataset row back as its structure (to render it in another language)."""
    return G.document_from_records(row["family"], row["topic"], row["language"], list(row["sentences"]), row["text"])


def render_row(row, language: str) -> str:
    """The text of a row (a document of any saved world) in "en", "ko" or "tr", rendered from its sentences."""
    return render(row_document(row), language)["text"]


def features():
    import datasets

    string = datasets.Value("string")
    sentence = {"start": datasets.Value("int32"), "text": string, "fact_id": string, "relation": string, "order": string,
                "language": string, "template_id": string, "role": string, "entities": [string], "slots": string}
    return datasets.Features({
        "id": datasets.Value("int64"), "doc_id": string, "text": string, "family": string, "topic": string,
        "language": string, "entities": datasets.Sequence(string), "fact_ids": datasets.Sequence(string),
        "word_order": string, "sentences": [sentence],
    })


def build_world(config: WorldConfig):
    """The world as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits (a seeded random
    ``validation_fraction`` of the documents; every fact is stated in many documents, so none is held out by it)."""
    import datasets

    docs = generate_documents(config)
    n_val = max(1, int(round(config.validation_fraction * len(docs))))
    val_ids = set(random.Random(config.seed + 1).sample(range(len(docs)), n_val))
    rows = {"train": [d for d in docs if d["id"] not in val_ids], "validation": [d for d in docs if d["id"] in val_ids]}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({c: [r[c] for r in split_rows] for c in COLUMNS}, features=features())
        for split, split_rows in rows.items()
    })


def documents_digest(documents: list[dict]) -> str:
    """sha256 of the generated documents (text and labels): a built world is checked against it, so an edit of the
    vocabulary or the generators rebuilds it even when the WorldConfig is unchanged."""
    return hashlib.sha256(json.dumps(documents, sort_keys=True, default=str).encode()).hexdigest()


def dataset_digest(dataset_path: Path) -> str:
    """sha256 of every split's texts of a saved DatasetDict (splits in name order): the identity of the data a
    tokenizer or model was trained on, whatever folder it sits in."""
    import datasets

    world = datasets.load_from_disk(str(dataset_path))
    digest = hashlib.sha256()
    for split in sorted(world):
        digest.update(split.encode())
        for text in world[split]["text"]:
            digest.update(text.encode())
            digest.update(b"\x00")
    return digest.hexdigest()


def save_world(config: WorldConfig, path: Path) -> Path:
    """Build and ``save_to_disk`` the world, plus facts.json, world_config.json and documents_sha256.txt beside it."""
    path = Path(path)
    world = build_world(config)
    path.mkdir(parents=True, exist_ok=True)
    world.save_to_disk(str(path / "dataset"))
    (path / "facts.json").write_text(json.dumps([dataclasses.asdict(f) for f in make_facts(config)], indent=1))
    (path / "world_config.json").write_text(json.dumps(config.as_dict(), indent=1, sort_keys=True))
    (path / "documents_sha256.txt").write_text(documents_digest(generate_documents(config)))
    return path / "dataset"


def load_facts(world_dir: str | Path) -> list[Fact]:
    """The facts of a saved world: facts.json in ``world_dir`` (or beside a dataset folder given instead)."""
    world_dir = Path(world_dir)
    path = world_dir / "facts.json"
    if not path.exists() and (world_dir.parent / "facts.json").exists():
        path = world_dir.parent / "facts.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: build the world first (make zoo, or world.save_world)")
    return [Fact(**row) for row in json.loads(path.read_text())]
