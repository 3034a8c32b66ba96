"""The facts a model knows (known_facts.json of `make zoo`): which (model, query) pairs the studies' known-facts
verdicts use."""

import json
from types import SimpleNamespace

from experiments.queries import Query
import pandas as pd

from experiments.study import known_fact_ids, known_label, known_pairs, on_known_facts


def _inputs(tmp_path, name, shares):
    folder = tmp_path / name / "model"
    folder.mkdir(parents=True)
    if shares is not None:
        (folder.parent / "known_facts.json").write_text(json.dumps(shares))
    queries = [Query(name="fact_a", prompt="p", completion=" a", fact_ids=("A",)),
               Query(name="fact_b", prompt="p", completion=" b", fact_ids=("B",)),
               Query(name="math", prompt="p", completion=" 1")]
    return SimpleNamespace(loaded=SimpleNamespace(path=str(folder)), model_name=name, queries=queries)


def test_known_facts_by_share_and_pairs(tmp_path):
    small = _inputs(tmp_path, "small", {"A": 0.333, "B": 0.0})
    large = _inputs(tmp_path, "large", {"A": 1.0, "B": 0.667})
    plain = _inputs(tmp_path, "plain", None)
    assert known_fact_ids(small, 0.66) == set() and known_fact_ids(large, 0.66) == {"A", "B"}
    assert known_fact_ids(large, 0.7) == {"A"} and known_fact_ids(plain, 0.66) is None
    # queries without facts never count as known; a model without the file adds nothing
    assert known_pairs([small, large, plain], 0.66) == {("large", "fact_a"), ("large", "fact_b")}
    assert known_pairs([plain], 0.66) is None


def test_rows_on_known_facts_and_their_label():
    frame = pd.DataFrame({"model": ["large", "large", "small"], "query": ["fact_a", "math", "fact_a"]}, index=[5, 6, 7])
    mask = on_known_facts(frame, {("large", "fact_a")})
    assert mask.tolist() == [True, False, False] and list(mask.index) == [5, 6, 7]
    assert known_label(0.66) == "facts the model knows (>= 0.66 of its competence paraphrases)"
