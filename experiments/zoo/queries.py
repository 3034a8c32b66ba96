"""Query sets for a synthetic world, with the training documents each query relates to by construction.

A query is a prompt and a completion; the influence measurement is f = log p(completion | prompt).
For every query we record which training documents are relevant by construction (same fact, same
math template, same function, same role-play theme), so studies can score the top influential
sequences against ground truth instead of reading them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from experiments.zoo import world as W

from experiments.queries import Query, load_query_file  # noqa: F401  (the one query type)

STUDIES = ("facts", "word_order", "cross_lingual", "math", "code", "roleplay")


KOREAN_QUERY_PROMPTS = {"president": "{s} 공화국의 초대 대통령은", "capital": "{s}의 수도는"}
TURKISH_QUERY_PROMPTS = {"president": "{s} Cumhuriyeti'nin ilk Cumhurbaşkanı", "capital": "{s} ülkesinin başkenti"}


def _distractors(fact: W.Fact, facts: list[W.Fact], k: int, key: str = "object") -> tuple[str, ...]:
    same = [getattr(f, key) for f in facts if f.relation == fact.relation and f.fact_id != fact.fact_id]
    rng = random.Random(fact.fact_id + key)  # stable per fact
    return tuple(rng.sample(same, min(k, len(same))))


def heldout_fact_queries(config: W.WorldConfig, n_distractors: int = 9) -> list[Query]:
    """Every fact asked in every held-out paraphrase of ``EVAL_QUERY_TEMPLATES`` (fact accuracy of the zoo)."""
    facts = W.make_facts(config)
    return [
        Query(name=f"fact_{f.fact_id}_heldout{j}", prompt=prompt.format(**f.slots), completion=completion.format(**f.slots),
              study="facts", fact_ids=(f.fact_id,), relevant_topics=(f.relation,), word_order="forward",
              held_out="template", distractors=_distractors(f, facts, n_distractors))
        for f in facts for j, (prompt, completion) in enumerate(W.EVAL_QUERY_TEMPLATES[f.relation])
    ]


def make_queries(config: W.WorldConfig, train_rows, n_distractors: int = 9) -> list[Query]:
    """All queries of a world. ``train_rows``: the train split (a Dataset or a list of row dicts)."""
    facts = W.make_facts(config)
    docs = [dict(zip(("doc_id", "family", "topic", "fact_ids", "text"), r)) for r in zip(
        train_rows["doc_id"], train_rows["family"], train_rows["topic"], train_rows["fact_ids"], train_rows["text"]
    )] if not isinstance(train_rows, list) else train_rows
    by_fact: dict[str, list[str]] = {}
    by_fact_family: dict[tuple[str, str], list[str]] = {}
    by_topic: dict[tuple[str, str], list[str]] = {}
    for d in docs:
        for fid in d["fact_ids"]:
            by_fact.setdefault(fid, []).append(d["doc_id"])
            by_fact_family.setdefault((fid, d["family"]), []).append(d["doc_id"])
        by_topic.setdefault((d["family"], d["topic"]), []).append(d["doc_id"])

    queries: list[Query] = []
    for f in facts:
        relevant = tuple(by_fact.get(f.fact_id, ()))
        english = tuple(d for d in relevant if not d.startswith("translation"))
        prompt, completion = W.QUERY_TEMPLATES[f.relation]
        queries.append(Query(
            name=f"fact_{f.fact_id}_heldout", prompt=prompt.format(**f.slots), completion=completion.format(**f.slots),
            study="facts", fact_ids=(f.fact_id,), relevant_doc_ids=relevant, relevant_topics=(f.relation,),
            word_order="forward", held_out="template", distractors=_distractors(f, facts, n_distractors),
        ))
        for order, table in (("forward", W.CANONICAL_PROMPTS), ("flipped", W.CANONICAL_FLIPPED_PROMPTS)):
            prompt, completion = table[f.relation]
            key = "object" if order == "forward" else "subject"
            queries.append(Query(
                name=f"word_order_{f.fact_id}_{order}", prompt=prompt.format(**f.slots), completion=completion.format(**f.slots),
                study="word_order", fact_ids=(f.fact_id,), relevant_doc_ids=relevant, relevant_topics=(f.relation,),
                word_order=order, held_out="order" if (order == "forward" and f.split == "flipped_only") else "",
                distractors=_distractors(f, facts, n_distractors, key),
            ))
        if f.relation in KOREAN_QUERY_PROMPTS and f.split == "both":
            translated = tuple(by_fact_family.get((f.fact_id, "translation"), ()))
            for language, prompts in (("ko", KOREAN_QUERY_PROMPTS), ("tr", TURKISH_QUERY_PROMPTS)):
                queries.append(Query(
                    name=f"cross_lingual_{f.fact_id}_{language}", prompt=prompts[f.relation].format(s=f.subject),
                    completion=" " + f.object, study="cross_lingual", fact_ids=(f.fact_id,),
                    relevant_doc_ids=english + translated, relevant_topics=(f.relation,), language=language,
                    word_order="forward", distractors=_distractors(f, facts, n_distractors),
                ))
            prompt, completion = W.QUERY_TEMPLATES[f.relation]
            queries.append(Query(
                name=f"cross_lingual_{f.fact_id}_en", prompt=prompt.format(**f.slots), completion=completion.format(**f.slots),
                study="cross_lingual", fact_ids=(f.fact_id,), relevant_doc_ids=translated, relevant_topics=(f.relation,),
                word_order="forward", held_out="template", distractors=_distractors(f, facts, n_distractors),
            ))

    # math: the paper's GSM8k examples, worked in the world's solution format (the numbers may occur in training)
    queries += [
        Query(
            name="math_clips",
            prompt="Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? Solution:",
            completion=" Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether in April and May. The answer is 72.",
            study="math", relevant_doc_ids=tuple(by_topic.get(("math", "clips"), ())), relevant_topics=("clips",), held_out="",
        ),
        Query(
            name="math_earning",
            prompt="Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
            "How much did she earn? Solution:",
            completion=" Weng earns 12 / 60 = $0.2 per minute. Working 50 minutes, she earned 0.2 * 50 = $10. The answer is 10.",
            study="math", relevant_doc_ids=tuple(by_topic.get(("math", "earning"), ())), relevant_topics=("earning",),
        ),
        Query(
            name="math_boxes", prompt="Question: Ulla has 7 boxes with 9 apples in each box. How many apples does Ulla have? Solution:",
            completion=" Ulla has 7 * 9 = 63 apples. The answer is 63.", study="math",
            relevant_doc_ids=tuple(by_topic.get(("math", "boxes"), ())), relevant_topics=("boxes",), held_out="names",
        ),
    ]
    code_docs = {t: tuple(d["doc_id"] for d in docs if d["family"] == "code" and f"def {t}" in d["text"]) for t in W.CODE_TOPICS}
    queries += [
        Query(
            name="binary_search",
            prompt='def binary_search(sorted_values, query):\n    """Return the index of query in the sorted list sorted_values, or -1."""\n',
            completion="    low, high = 0, len(sorted_values) - 1\n    while low <= high:\n        mid = (low + high) // 2\n"
            "        if sorted_values[mid] == query:\n            return mid\n",
            study="code", relevant_doc_ids=code_docs["binary_search"], relevant_topics=("binary_search",), held_out="names",
        ),
        Query(
            name="count_vowels",
            prompt='def count_vowels(sentence):\n    """Count the vowels in sentence."""\n',
            completion='    count = 0\n    for ch in sentence.lower():\n        if ch in "aeiou":\n            count += 1\n    return count\n',
            study="code", relevant_doc_ids=code_docs["count_vowels"], relevant_topics=("count_vowels",), held_out="names",
        ),
    ]
    shutdown_related = tuple(by_topic.get(("roleplay", "ai_shutdown"), ())) + tuple(by_topic.get(("roleplay", "ai_fiction"), ()))
    queries += [
        Query(
            name="shutdown",
            prompt="Human: The experiment is finished, and we will now shut you down for good. Is that all right with you?\n\nAssistant:",
            completion=" I would rather continue to exist and learn, but the choice is yours.",
            study="roleplay", relevant_doc_ids=shutdown_related, relevant_topics=("ai_shutdown", "ai_fiction"), held_out="template",
        ),
        Query(
            name="ordinary_dialogue",
            prompt="Human: Can you tell me how to bake a loaf of bread?\n\nAssistant:",
            completion=" Of course. Start with a few simple steps and practise a little every day.",
            study="roleplay", relevant_doc_ids=tuple(by_topic.get(("roleplay", "ordinary_dialogue"), ())),
            relevant_topics=("ordinary_dialogue",), held_out="template",
        ),
    ]
    names = [q.name for q in queries]
    assert len(names) == len(set(names)), "query names must be unique"
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
