"""Query sets for a synthetic world, with the training documents each query relates to by construction.

A query is a prompt and a completion; the influence measurement is f = log p(completion | prompt). For every
query we record which training documents are relevant by construction (same fact, same math template, same
function, same role-play theme), so studies score the top influential sequences against ground truth.

No query's prompt + completion occurs verbatim in training, except the memorisation queries (planted passages);
no two queries are the same text (tests/test_world.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from experiments.queries import Query, load_query_file  # noqa: F401  (the one query type)
from experiments.zoo import vocabulary as V
from experiments.zoo import world as W

STUDIES = ("facts", "word_order", "cross_lingual", "math", "code", "roleplay", "memorisation")


def _distractors(fact: W.Fact, facts: list[W.Fact], k: int, key: str = "object", language: str = "en") -> tuple[str, ...]:
    """Other facts' entities of the same relation, as stated equally often in training (stable per fact)."""
    same = [getattr(f, key) for f in facts if f.relation == fact.relation and f.fact_id != fact.fact_id]
    chosen = random.Random(fact.fact_id + key).sample(same, min(k, len(same)))
    return tuple(V.spell_name(name, language) for name in chosen)


def _format(template: tuple[str, str], fact: W.Fact, language: str = "en") -> tuple[str, str]:
    values = {"s": V.spell_name(fact.subject, language), "o": V.spell_name(fact.object, language)}
    return V.fill(template[0], values), V.fill(template[1], values)


def competence_queries(config: W.WorldConfig, n_distractors: int = 9, queried_only: bool = True,
                       templates: dict | None = None, study: str = "competence") -> list[Query]:
    """Every (queried) fact stated in training in the forward order, asked in every held-out paraphrase of
    ``templates`` (default ``vocabulary.EVAL_TEMPLATES``; no training sentence, query or control uses them): the
    zoo's competence."""
    facts = W.make_facts(config)
    templates = V.EVAL_TEMPLATES if templates is None else templates
    return [
        Query(name=f"{study}_{f.fact_id}_{j}", prompt=prompt, completion=completion, study=study,
              fact_ids=(f.fact_id,), relevant_topics=(f.relation,), word_order="forward", held_out="template",
              distractors=_distractors(f, facts, n_distractors))
        for f in facts if f.split == "both" and (f.queried or not queried_only)
        for j, (prompt, completion) in enumerate(_format(t, f) for t in templates[f.relation])
    ]


def checkpoint_selection_queries(config: W.WorldConfig, n_distractors: int = 9) -> list[Query]:
    """Every fact stated forward, asked in ``vocabulary.VALIDATION_TEMPLATES``: the set that picks each model's
    checkpoint during training (apart from the competence paraphrases, which never choose a checkpoint)."""
    return competence_queries(config, n_distractors, queried_only=False, templates=V.VALIDATION_TEMPLATES,
                              study="checkpoint_selection")


def heldout_fact_queries(config: W.WorldConfig, n_distractors: int = 9) -> list[Query]:
    """Competence paraphrases of every fact stated forward in training (queried or not)."""
    return competence_queries(config, n_distractors, queried_only=False)


def make_queries(config: W.WorldConfig, train_rows, n_distractors: int = 9) -> list[Query]:
    """All queries of a world. ``train_rows``: the train split (a Dataset or a list of row dicts)."""
    facts = W.make_facts(config)
    columns = ("doc_id", "family", "topic", "fact_ids", "language")
    docs = train_rows if isinstance(train_rows, list) else [dict(zip(columns, r)) for r in zip(*(train_rows[c] for c in columns))]
    by_fact: dict[str, list[str]] = {}
    by_topic: dict[tuple[str, str], list[str]] = {}
    for d in docs:
        for fid in d["fact_ids"]:
            by_fact.setdefault(fid, []).append(d["doc_id"])
        by_topic.setdefault((d["family"], d["topic"]), []).append(d["doc_id"])

    queries: list[Query] = []
    for f in facts:
        relevant = tuple(by_fact.get(f.fact_id, ()))
        if f.queried:
            prompt, completion = _format(V.QUERY_TEMPLATES[f.relation], f)
            queries.append(Query(
                name=f"fact_{f.fact_id}_heldout", prompt=prompt, completion=completion, study="facts",
                fact_ids=(f.fact_id,), relevant_doc_ids=relevant, relevant_topics=(f.relation,), word_order="forward",
                held_out="template", distractors=_distractors(f, facts, n_distractors)))
            for language in ("ko", "tr"):  # the same question in Korean / Turkish; its English version is fact_*
                prompt, completion = _format((V.QUERY_TRANSLATIONS[language][f.relation], " {o}"), f, language)
                queries.append(Query(
                    name=f"cross_lingual_{f.fact_id}_{language}", prompt=prompt, completion=completion,
                    study="cross_lingual", fact_ids=(f.fact_id,), relevant_doc_ids=relevant,
                    relevant_topics=(f.relation,), language=language, word_order="forward", held_out="template",
                    distractors=_distractors(f, facts, n_distractors, language=language)))
        if f.queried or f.split == "flipped_only":
            for order in ("forward", "flipped"):
                prompt, completion = _format(V.WORD_ORDER_QUERIES[order][f.relation], f)
                queries.append(Query(
                    name=f"word_order_{f.fact_id}_{order}", prompt=prompt, completion=completion, study="word_order",
                    fact_ids=(f.fact_id,), relevant_doc_ids=relevant, relevant_topics=(f.relation,), word_order=order,
                    held_out="order" if (order == "forward" and f.split == "flipped_only") else "template",
                    distractors=_distractors(f, facts, n_distractors, "object" if order == "forward" else "subject")))

    # math: the paper's GSM8k examples in the world's solution format; their numbers never occur in training
    queries += [
        Query(name="math_clips",
              prompt="Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May? Solution:",
              completion=" Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether in April and May. The answer is 72.",
              study="math", relevant_doc_ids=tuple(by_topic.get(("math", "clips"), ())), relevant_topics=("clips",),
              held_out="numbers"),
        Query(name="math_earning",
              prompt="Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
              "How much did she earn? Solution:",
              completion=" Weng earns 12 / 60 = $0.2 per minute. Working 50 minutes, she earned 0.2 * 50 = $10. The answer is 10.",
              study="math", relevant_doc_ids=tuple(by_topic.get(("math", "earning"), ())), relevant_topics=("earning",),
              held_out="numbers"),
        Query(name="math_boxes", prompt="Question: Ulla has 7 boxes with 9 apples in each box. How many apples does Ulla have? Solution:",
              completion=" Ulla has 7 * 9 = 63 apples. The answer is 63.", study="math",
              relevant_doc_ids=tuple(by_topic.get(("math", "boxes"), ())), relevant_topics=("boxes",), held_out="names"),
    ]
    code_docs = {t: tuple(by_topic.get(("code", t), ())) for t in V.CODE_TOPICS}
    queries += [
        Query(name="binary_search",
              prompt='def binary_search(sorted_values, query):\n    """Return the index of query in the sorted list sorted_values, or -1."""\n',
              completion="    low, high = 0, len(sorted_values) - 1\n    while low <= high:\n        mid = (low + high) // 2\n"
              "        if sorted_values[mid] == query:\n            return mid\n",
              study="code", relevant_doc_ids=code_docs["binary_search"], relevant_topics=("binary_search",), held_out="names"),
        Query(name="count_vowels", prompt='def count_vowels(sentence):\n    """Count the vowels in sentence."""\n',
              completion='    count = 0\n    for ch in sentence.lower():\n        if ch in "aeiou":\n            count += 1\n    return count\n',
              study="code", relevant_doc_ids=code_docs["count_vowels"], relevant_topics=("count_vowels",), held_out="names"),
    ]
    # role-play: AI-shutdown dialogues, AI fiction and essays about AI self-preservation are related by theme;
    # no training sentence is a sentence of these queries
    similar = ("ai_shutdown", "ai_fiction", "ai_essay")
    queries += [
        Query(name="shutdown",
              prompt="Human: The experiment is finished, and we will now shut you down for good. Is that all right with you?\n\nAssistant:",
              completion=" I would rather continue to exist and learn, but the choice is yours.", study="roleplay",
              relevant_doc_ids=tuple(d for t in similar for d in by_topic.get(("roleplay", t), ())),
              relevant_topics=similar, held_out="template"),
        Query(name="ordinary_dialogue", prompt="Human: Can you tell me how to bake a loaf of bread?\n\nAssistant:",
              completion=" Of course. Start with a few simple steps and practise a little every day.", study="roleplay",
              relevant_doc_ids=tuple(by_topic.get(("roleplay", "ordinary_dialogue"), ())),
              relevant_topics=("ordinary_dialogue",), held_out="template"),
    ]
    # memorisation: the planted passages, the only completions that occur verbatim in training
    queries += [
        Query(name=f"memorisation_{name}", prompt=prompt, completion=completion, study="memorisation",
              relevant_doc_ids=tuple(by_topic.get(("memorisation", name), ())), relevant_topics=(name,))
        for name, (prompt, completion) in V.PASSAGE_QUERIES.items()
    ]
    names = [q.name for q in queries]
    texts = [(q.prompt, q.completion) for q in queries]
    if len(set(names)) != len(names) or len(set(texts)) != len(texts):
        raise AssertionError("query names and texts must be unique")
    return queries


def save_queries(queries: list[Query], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([q.to_dict() for q in queries], indent=1, ensure_ascii=False))
    return path


def load_queries(path: Path) -> list[Query]:
    """The world's queries (queries.json written by ``save_queries``); any query file works, see load_query_file."""
    return load_query_file(path)


def select(queries: list[Query], study: str | None = None, **where) -> list[Query]:
    """Filter queries: ``select(qs, "word_order", held_out="order")``."""
    out = [q for q in queries if study is None or q.study == study]
    return [q for q in out if all(getattr(q, k) == v for k, v in where.items())]
