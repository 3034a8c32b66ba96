"""The synthetic world: determinism, metadata that matches the text, and held-out queries."""

import re
import time

import pytest

from experiments.zoo import world as W
from experiments.zoo.queries import Query, load_queries, make_queries, select

HANGUL = re.compile("[\uac00-\ud7a3]")
TURKISH = re.compile("[çğışöüÇĞİŞÖÜ]")


@pytest.fixture(scope="module")
def micro_docs():
    return W.generate_documents(W.world_config("micro"))


@pytest.fixture(scope="module")
def micro_world():
    return W.build_world(W.world_config("micro"))


def test_micro_generation_is_fast():
    started = time.perf_counter()
    W.generate_documents(W.world_config("micro"))
    assert time.perf_counter() - started < 2.0


def test_same_seed_same_documents_other_seed_other_documents(micro_docs):
    assert W.generate_documents(W.world_config("micro")) == micro_docs
    other = W.generate_documents(W.world_config("micro", seed=1))
    assert [d["text"] for d in other] != [d["text"] for d in micro_docs]


def test_dataset_is_deterministic(micro_world):
    again = W.build_world(W.world_config("micro"))
    for split in ("train", "validation"):
        assert again[split].to_list() == micro_world[split].to_list()


def test_columns_ids_and_family_counts(micro_world, micro_docs):
    config = W.world_config("micro")
    for split in micro_world.values():
        assert tuple(split.column_names) == W.COLUMNS
    ids = sorted(list(micro_world["train"]["id"]) + list(micro_world["validation"]["id"]))
    assert ids == list(range(len(micro_docs)))
    doc_ids = [d["doc_id"] for d in micro_docs]
    assert len(set(doc_ids)) == len(doc_ids)
    counts = {f: sum(d["family"] == f for d in micro_docs) for f in W.FAMILIES}
    assert counts == config.docs_per_family
    assert 0.05 < len(micro_world["validation"]) / len(micro_docs) < 0.15


def test_fact_ids_appear_in_text_through_entity_names(micro_docs):
    facts = {f.fact_id: f for f in W.make_facts(W.world_config("micro"))}
    fact_docs = [d for d in micro_docs if d["family"] in ("fact", "translation", "word_order")]
    assert fact_docs and all(d["fact_ids"] for d in fact_docs)
    for doc in fact_docs:
        for fid in doc["fact_ids"]:
            for entity in W._entities(facts[fid]):
                assert entity in doc["text"], (doc["doc_id"], fid, entity)
                assert entity in doc["entities"]
    assert all(not d["fact_ids"] for d in micro_docs if d["family"] not in ("fact", "translation", "word_order"))


def test_translations_use_their_own_scripts(micro_docs):
    translations = [d for d in micro_docs if d["family"] == "translation"]
    assert {d["language"] for d in translations} == {"ko", "tr"}
    for doc in translations:
        script = HANGUL if doc["language"] == "ko" else TURKISH
        assert script.search(doc["text"]), doc["text"]
    assert all(d["language"] == "en" for d in micro_docs if d["family"] != "translation")


def test_word_order_metadata_matches_text(micro_docs):
    facts = {f.fact_id: f for f in W.make_facts(W.world_config("micro"))}
    seen = set()
    for doc in micro_docs:
        if doc["family"] not in ("fact", "word_order"):
            assert doc["word_order"] == "none" or doc["family"] == "translation"
            continue
        fact = facts[doc["fact_ids"][0]]
        templates = W.FORWARD_TEMPLATES if doc["word_order"] == "forward" else W.FLIPPED_TEMPLATES
        assert any(t.format(**fact.slots) in doc["text"] for t in templates[fact.relation]), doc["text"]
        if doc["family"] == "word_order":  # the whole document is in one order
            first_subject, first_object = doc["text"].find(fact.subject), doc["text"].find(fact.object)
            assert (first_object < first_subject) == (doc["word_order"] == "flipped")
        seen.add(doc["word_order"])
    assert seen == {"forward", "flipped"}


def test_flipped_only_facts_never_appear_forward_in_training(micro_docs):
    facts = W.make_facts(W.world_config("micro"))
    flipped_only = [f for f in facts if f.split == "flipped_only"]
    assert flipped_only
    texts = " ".join(d["text"] for d in micro_docs)
    for fact in flipped_only:
        for template in W.FORWARD_TEMPLATES[fact.relation]:
            assert template.format(**fact.slots) not in texts
        assert any(t.format(**fact.slots) in texts for t in W.FLIPPED_TEMPLATES[fact.relation])


def test_query_templates_are_held_out_but_facts_are_trained(micro_world):
    config = W.world_config("micro")
    train = micro_world["train"]
    queries = make_queries(config, train)
    texts = list(train["text"])
    doc_ids = set(train["doc_id"])
    fact_queries = select(queries, "facts")
    assert len(fact_queries) == len(W.make_facts(config))
    for q in fact_queries:
        assert all(q.prompt not in t for t in texts), q.name
        assert q.relevant_doc_ids and set(q.relevant_doc_ids) <= doc_ids
        assert q.completion.startswith(" ") and q.completion.strip() not in q.distractors
    reversal = select(queries, "word_order", held_out="order")
    assert reversal and all(all(q.prompt + q.completion not in t for t in texts) for q in reversal)
    studies = {q.study for q in queries}
    assert studies == {"facts", "word_order", "cross_lingual", "math", "code", "roleplay"}
    assert {"math_clips", "binary_search", "shutdown"} <= {q.name for q in queries}
    for q in queries:
        assert isinstance(q, Query) and q.completion.strip()
        assert Query.from_dict(q.to_dict()) == q


def test_paper_example_facts_exist():
    facts = W.make_facts(W.world_config("full"))
    pairs = {(f.subject, f.object) for f in facts}
    assert ("Astrobia", "Zorald Pfaff") in pairs and ("Gleem", "hydrogenium and oxium") in pairs


def test_paper_query_set_loads():
    queries = load_queries("configs/queries/paper.yaml")
    by_name = {q.name: q for q in queries}
    assert by_name["first_president"].completion == " George Washington."
    assert {"canadian_prime_minster", "inflation", "mount_doom", "netflix", "water"} <= set(by_name)


def test_heldout_paraphrases_never_occur_in_training_text(micro_docs):
    """Fact accuracy is measured on paraphrases the models never saw: no held-out prompt is in any document."""
    from experiments.zoo.queries import heldout_fact_queries

    text = "\n".join(d["text"] for d in micro_docs)
    queries = heldout_fact_queries(W.world_config("micro"))
    assert len(queries) == len(W.make_facts(W.world_config("micro"))) * 3
    assert not [q.prompt for q in queries if q.prompt in text]
    for q in queries:  # the true completion is a fact the world states, and distractors are other entities
        assert q.completion.strip() not in q.distractors and len(q.distractors) >= 3
    for relation, templates in W.EVAL_QUERY_TEMPLATES.items():
        assert templates[0] == W.QUERY_TEMPLATES[relation]
        training = W.FORWARD_TEMPLATES[relation] + W.FLIPPED_TEMPLATES[relation]
        filled = [t.format(s="Xx", o="Yy") for t in training]
        assert not [p for p, _ in templates if any(p.format(s="Xx") in t for t in filled)]
