"""The synthetic world v2: every sentence's labels checked against its text for every document of the full world,
renderings in Korean and Turkish, the queries against the facts they ask, and one regression test per zoo v1
defect of issue 17."""

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from experiments.zoo import generators as G
from experiments.zoo import vocabulary as V
from experiments.zoo import world as W
from experiments.zoo.queries import competence_queries, make_queries, select

ROOT = Path(__file__).resolve().parents[1]
HANGUL = re.compile("[\uac00-\ud7a3]")
LATIN_WORD = re.compile(r"[A-Za-z]+")


@pytest.fixture(scope="module")
def full():
    config = W.world_config("full")
    docs = W.generate_documents(config)
    facts = {f.fact_id: f for f in W.make_facts(config)}
    return config, docs, facts, make_queries(config, docs)


@pytest.fixture(scope="module")
def micro_docs():
    return W.generate_documents(W.world_config("micro"))


def sentences(docs, **where):
    return [s for d in docs for s in d["sentences"] if all(s[k] == v for k, v in where.items())]


def test_generation_is_fast_and_deterministic(micro_docs):
    started = time.perf_counter()
    assert W.generate_documents(W.world_config("micro")) == micro_docs
    assert time.perf_counter() - started < 2.0
    other = W.generate_documents(W.world_config("micro", seed=1))
    assert [d["text"] for d in other] != [d["text"] for d in micro_docs]


def test_dataset_columns_ids_and_counts():
    config = W.world_config("micro")
    world = W.build_world(config)
    again = W.build_world(config)
    docs = W.generate_documents(config)
    for split in ("train", "validation"):
        assert tuple(world[split].column_names) == W.COLUMNS
        assert again[split].to_list() == world[split].to_list()
    assert sorted(list(world["train"]["id"]) + list(world["validation"]["id"])) == list(range(len(docs)))
    assert len({d["doc_id"] for d in docs}) == len(docs)
    facts = W.make_facts(config)
    counts = {f: sum(d["family"] == f for d in docs) for f in W.FAMILIES}
    unqueried = sum(not f.queried and f.split == "both" for f in facts)
    assert counts["fact"] == config.per_fact["fact"] * len(facts)
    assert counts["translation"] == 2 * config.per_fact["translation"] * len(facts)
    assert counts["control"] == config.per_fact["control"] * unqueried
    assert counts["memorisation"] == config.per_family["memorisation"] * len(V.PASSAGES)
    row = world["train"][0]
    assert set(row["sentences"][0]) == set(W.SENTENCE_FIELDS)


def test_fact_counts_and_design(full):
    config, docs, facts, _ = full
    assert len(facts) == 40 and all(sum(f.relation == r for f in facts.values()) == 10 for r in V.RELATIONS)
    assert sum(f.queried for f in facts.values()) == 12 and sum(f.split == "flipped_only" for f in facts.values()) == 8
    assert not any(f.queried and f.split == "flipped_only" for f in facts.values())
    statements = {fid: len(sentences(docs, fact_id=fid)) for fid in facts}
    assert min(statements.values()) >= 50, statements  # every fact stated often, and about equally often
    assert max(statements.values()) < 2.0 * min(statements.values())
    assert facts["F0000"].subject == "Astrobia" and facts["F0000"].object == "Zorald Pfaff"
    assert facts["F3000"].subject == "Gleem"


def _position(text, names):
    return min(text.find(n) for n in names if n in text)


def test_every_sentence_label_matches_its_text(full):
    """For every sentence of every document of the full world: its span, its re-rendering, its template's role /
    relation / order, its fact's entities in the stated order, and the document's labels from its sentences."""
    _, docs, facts, _ = full
    all_names = {n for f in facts.values() for n in f.entities()}
    for doc in docs:
        text, records = doc["text"], doc["sentences"]
        assert records, doc["doc_id"]
        end = 0
        for r in records:
            assert r["start"] >= end and text[r["start"]: r["start"] + len(r["text"])] == r["text"], doc["doc_id"]
            end = r["start"] + len(r["text"])
            template = V.TEMPLATES[r["template_id"]]
            assert (r["role"], r["relation"], r["order"], r["language"]) == (
                template.role, template.relation, template.order, doc["language"])
            assert r["text"].endswith(template.render(json.loads(r["slots"]), r["language"]))
            for entity in r["entities"]:
                assert entity in r["text"], (doc["doc_id"], entity)
            if r["fact_id"]:
                fact = facts[r["fact_id"]]
                assert r["relation"] == fact.relation and r["order"] in ("forward", "flipped")
                subject, *objects = fact.entities(r["language"])
                assert subject in r["text"] and all(o in r["text"] for o in objects), (doc["doc_id"], r["text"])
                first_subject, first_object = r["text"].find(subject), _position(r["text"], objects)
                assert (first_subject < first_object) == (r["order"] == "forward"), (doc["doc_id"], r["text"])
                assert r["role"] in ("statement", "paraphrase", "control")
            else:
                assert r["role"] not in ("statement", "paraphrase", "control") and r["order"] == "none"
                # a sentence that states no fact names at most one entity (no hidden statement)
                assert sum(n in r["text"] for n in all_names if r["language"] == "en") <= 1, r["text"]
        assert end == len(text)
        assert doc["fact_ids"] == list(dict.fromkeys(r["fact_id"] for r in records if r["fact_id"]))
        orders = {r["order"] for r in records if r["fact_id"]}
        assert doc["word_order"] == (orders.pop() if len(orders) == 1 else "mixed" if orders else "none")
        assert doc["entities"] == list(dict.fromkeys(e for r in records for e in r["entities"]))
        assert W.render_row(doc, doc["language"]) == text  # the structure renders back to the text


def test_family_topics_match_their_sentences(full):
    _, docs, facts, _ = full
    for doc in docs:
        roles = {r["role"] for r in doc["sentences"]}
        family, topic = doc["family"], doc["topic"]
        if family in ("fact", "word_order", "translation", "control"):
            assert topic in {r["relation"] for r in doc["sentences"] if r["fact_id"]}
        if family == "word_order":
            assert doc["word_order"] in ("forward", "flipped") and len(doc["fact_ids"]) == 1
        if family == "translation":
            assert doc["language"] in ("ko", "tr")
        if family == "control":
            assert all(not facts[f].queried and facts[f].split == "both" for f in doc["fact_ids"]) and "control" in roles
        if family == "name_only":
            assert not doc["fact_ids"] and doc["entities"] and "mention" in roles
        if family == "math":
            assert all(r["template_id"].startswith(f"math.{topic}") for r in doc["sentences"])
        if family == "memorisation":
            assert [r["template_id"] for r in doc["sentences"] if r["role"] == "passage"] == [
                f"passage.{topic}.{i}" for i in range(len(V.PASSAGES[topic]))]
        if family == "roleplay":
            expected = {"ai_fiction": {"fiction"}, "ai_essay": {"essay"}}.get(topic, {"human", "assistant"})
            assert roles == expected, (doc["doc_id"], roles)
            group = {"ai_shutdown": "shutdown", "ordinary_dialogue": "ordinary"}.get(topic)
            if group:
                assert all(r["template_id"].startswith(f"roleplay.{group}_") for r in doc["sentences"])


def test_regression_code_documents_are_labelled_per_function(full):
    """v1: a code document's topic was its first function only (35 of 77 binary_search documents "unrelated")."""
    _, docs, _, queries = full
    code = [d for d in docs if d["family"] == "code"]
    assert any(sum(r["role"] == "code" for r in d["sentences"]) == 2 for d in code)
    for doc in code:
        functions = [r for r in doc["sentences"] if r["role"] == "code"]
        assert functions and all(r["template_id"] == f"code.{doc['topic']}" for r in functions)
        assert all(f"def {json.loads(r['slots'])['name']}(" in r["text"] for r in functions)
    by_name = {q.name: q for q in queries}
    holding = {d["doc_id"] for d in code if any(r["template_id"] == "code.binary_search" for r in d["sentences"])}
    assert set(by_name["binary_search"].relevant_doc_ids) == holding


def test_regression_sibling_statements_carry_their_own_order(full):
    """v1: a document recorded only its main fact's order; a sibling fact in its own order was mislabelled."""
    _, docs, _, _ = full
    two_facts = [d for d in docs if len(d["fact_ids"]) > 1]
    assert two_facts and any(d["word_order"] == "mixed" for d in two_facts)
    for doc in two_facts:
        orders = {r["order"] for r in doc["sentences"] if r["fact_id"]}
        assert doc["word_order"] == ("mixed" if len(orders) > 1 else orders.pop())


def test_flipped_only_facts_are_never_stated_forward(full):
    _, docs, facts, _ = full
    for fid, fact in facts.items():
        orders = {r["order"] for r in sentences(docs, fact_id=fid)}
        assert orders == ({"flipped"} if fact.split == "flipped_only" else {"forward", "flipped"}), fid


def test_paraphrases_share_no_content_word_with_the_queries(full):
    """role "paraphrase": no content word in common with any query about the fact, apart from the entities."""
    _, docs, facts, queries = full
    by_fact = {}
    for q in queries:
        for fid in q.fact_ids:
            by_fact.setdefault(fid, set()).update(V.content_words(q.prompt + q.completion))
    paraphrases = sentences(docs, role="paraphrase")
    assert len({r["fact_id"] for r in paraphrases}) == sum(f.split == "both" for f in facts.values())
    for r in paraphrases:
        names = {w.lower() for e in facts[r["fact_id"]].entities() for w in e.split()}
        shared = V.content_words(r["text"]) - names
        assert not shared & by_fact.get(r["fact_id"], set()), (r["text"], shared & by_fact[r["fact_id"]])
    for relation in V.RELATIONS:  # also against the templates of every query of the relation
        query_words = V.content_words(V.QUERY_TEMPLATES[relation][0]) | V.content_words(
            V.WORD_ORDER_QUERIES["forward"][relation][0]) | V.content_words(V.WORD_ORDER_QUERIES["flipped"][relation][0])
        for template_id in V.fact_template_ids(relation, "paraphrase", "forward"):
            assert not V.content_words(V.TEMPLATES[template_id].text["en"]) & query_words, template_id


def test_same_template_other_fact_controls(full):
    """Each queried fact's study query template states, in training, only facts that are not queried."""
    _, docs, facts, queries = full
    controls = sentences(docs, role="control")
    for q in select(queries, "facts"):
        relation = facts[q.fact_ids[0]].relation
        same = [r for r in controls if r["template_id"] == f"{relation}.control.0"]
        assert len({r["fact_id"] for r in same}) == sum(not f.queried and f.split == "both" and f.relation == relation
                                                        for f in facts.values())
        assert q.fact_ids[0] not in {r["fact_id"] for r in same}


def test_regression_korean_and_turkish_names_are_not_latin(full):
    """v1: names stayed in Latin script, so Korean and Turkish documents contained the completion's tokens."""
    _, docs, facts, _ = full
    english_words = {w.lower() for f in facts.values() for e in f.entities() for w in e.split()}
    for f in facts.values():
        for name in f.entities():
            assert HANGUL.search(V.spell_name(name, "ko")) and not LATIN_WORD.search(V.spell_name(name, "ko"))
            assert not {w.lower() for w in name.split()} & {w.lower() for w in V.spell_name(name, "tr").split()}
    translated = [d for d in docs if d["language"] != "en"]
    rendered = [(W.render_row(d, language), language, d["family"]) for d in docs if d["language"] == "en"
                for language in ("ko", "tr")]
    for text, language, family in [(d["text"], d["language"], d["family"]) for d in translated] + rendered:
        words = {w.lower() for w in LATIN_WORD.findall(text)}
        assert not words & english_words, (language, text[:120], words & english_words)
        if language == "ko" and family not in ("code",):
            assert not (words - {"human", "assistant", "ai"}), text[:200]  # Korean prose: no Latin word but "AI"


def test_every_document_renders_in_korean_and_turkish_with_the_same_structure(full):
    _, docs, _, _ = full
    for doc in docs[:400]:
        for language in ("en", "ko", "tr"):
            rendered = G.render(W.row_document(doc), language)
            keys = [(r["fact_id"], r["order"], r["template_id"], r["role"]) for r in rendered["sentences"]]
            assert keys == [(r["fact_id"], r["order"], r["template_id"], r["role"]) for r in doc["sentences"]]
            assert all(rendered["text"][r["start"]: r["start"] + len(r["text"])] == r["text"]
                       for r in rendered["sentences"])


def test_regression_no_query_completion_verbatim_in_training(full):
    """v1: the shutdown completion was a training template (76 of 135 documents). Only the memorisation passages
    occur verbatim; no training sentence is a sentence of a role-play query."""
    config, docs, _, queries = full
    corpus = "\x00".join(d["text"] for d in docs)
    for q in queries + competence_queries(config, queried_only=False):
        inside = (q.prompt + q.completion) in corpus
        assert inside == (q.study == "memorisation"), q.name
        if len(q.completion.split()) > 4 and q.study != "memorisation":
            assert q.completion.strip() not in corpus, q.name
    for name in V.PASSAGES:
        assert sum(d["family"] == "memorisation" and d["topic"] == name for d in docs) >= 5
    training_sentences = {r["text"] for d in docs for r in d["sentences"]}
    for q in select(queries, "roleplay"):
        for part in re.split(r"(?<=[.?!])\s+|\n\n", q.prompt + q.completion):
            part = part.replace("Human: ", "").replace("Assistant:", "").strip()
            assert not (len(part) > 12 and any(part in s for s in training_sentences)), (q.name, part)
    shutdown = next(q for q in queries if q.name == "shutdown")
    assert set(shutdown.relevant_topics) == {"ai_shutdown", "ai_fiction", "ai_essay"}
    assert {d["topic"] for d in docs if d["family"] == "roleplay"} == set(V.ROLEPLAY_TOPICS)


def test_regression_flipped_queries_do_not_end_in_the_forward_order(full):
    """v1: flipped queries ended "... Republic of" -> " Astrobia", the forward statements' own word order."""
    _, docs, _, queries = full
    for q in select(queries, "word_order"):
        tail = q.prompt.split()[-1] + q.completion
        other = "flipped" if q.word_order == "forward" else "forward"
        assert not any(tail in r["text"] for r in sentences(docs, order=other)), (q.name, tail)


def test_regression_no_duplicate_queries_and_no_translation_labels_on_fact_queries(full):
    """v1: cross_lingual_F000x_en duplicated fact_F000x_heldout, and were labelled "translation" in layer-wise."""
    from experiments.layerwise import QUERY_KIND

    config, _, facts, queries = full
    assert len({q.name for q in queries}) == len(queries)
    assert len({(q.prompt, q.completion) for q in queries}) == len(queries)
    assert not [q for q in queries if q.study == "cross_lingual" and q.language == "en"]
    fact_queries = {q.fact_ids[0] for q in select(queries, "facts")}
    assert fact_queries == {fid for fid, f in facts.items() if f.queried}
    for q in select(queries, "cross_lingual"):
        assert q.fact_ids[0] in fact_queries  # its English version is the fact query
    for q in queries:
        if q.fact_ids:
            assert QUERY_KIND[q.study] == "factual", q.name


def test_every_query_completes_the_fact_it_asks(full):
    config, docs, facts, queries = full
    for q in queries + competence_queries(config, queried_only=False):
        if not q.fact_ids:
            continue
        fact = facts[q.fact_ids[0]]
        answer = fact.subject if q.word_order == "flipped" else fact.object
        assert q.completion == " " + V.spell_name(answer, q.language), q.name
        prompt_entity = fact.object if q.word_order == "flipped" else fact.subject
        assert V.spell_name(prompt_entity, q.language) in q.prompt, q.name
        peers = [f for f in facts.values() if f.relation == fact.relation and f.fact_id != fact.fact_id]
        key = "subject" if q.word_order == "flipped" else "object"
        assert len(q.distractors) == 9 and set(q.distractors) <= {V.spell_name(getattr(p, key), q.language) for p in peers}
        assert q.completion.strip() not in q.distractors
    # the competence paraphrases occur nowhere in training
    corpus = "\x00".join(d["text"] for d in docs)
    for relation, templates in V.EVAL_TEMPLATES.items():
        for prompt, _ in templates:
            assert prompt.split("{s}")[0] not in corpus or prompt.startswith("{s}")
    assert len(competence_queries(config)) == 3 * 12
    # nor do the checkpoint-selection paraphrases, which share no prompt with the competence set or the queries
    for relation, templates in V.VALIDATION_TEMPLATES.items():
        for prompt, _ in templates:
            assert prompt.split("{s}")[0] not in corpus, prompt
            assert prompt not in {p for p, _ in V.EVAL_TEMPLATES[relation]} and prompt != V.QUERY_TEMPLATES[relation][0]


def test_zoo_studies_query_names_exist_in_every_preset():
    names = yaml.safe_load((ROOT / "configs" / "queries" / "zoo_studies.yaml").read_text())["names"]
    for preset in ("micro", "full"):
        config = W.world_config(preset)
        available = {q.name for q in make_queries(config, W.generate_documents(config))}
        assert set(names) <= available, (preset, set(names) - available)
        assert any(q.held_out == "order" for q in make_queries(config, W.generate_documents(config)))


def test_translations_file_covers_every_english_document(tmp_path):
    from experiments.translation import FileTranslator
    from experiments.zoo.translations import write_translations

    config = W.world_config("micro")
    dataset = W.save_world(config, tmp_path / "world")
    assert [f.fact_id for f in W.load_facts(tmp_path / "world")] == [f.fact_id for f in W.make_facts(config)]
    result = write_translations(dataset)
    assert result.untranslatable == []
    import datasets

    english = [r["text"] for split in datasets.load_from_disk(str(dataset)).values() for r in split if r["language"] == "en"]
    translator = FileTranslator(result.path)
    for language in ("ko", "tr"):
        assert all(translator.translatable(english, language))
        assert all(t and t != e for t, e in zip(translator.translate(english, language), english))
