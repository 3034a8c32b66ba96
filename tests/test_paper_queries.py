"""The paper's query set (configs/queries/paper.yaml) and word-order probes (configs/probes/word_order_paper.yaml):
every App E query once, each with its text and a source, or else an explicit not-found note."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUERIES = REPO / "configs" / "queries" / "paper.yaml"
PROBES = REPO / "configs" / "probes" / "word_order_paper.yaml"

APP_E = {
    "factual": ["first_president", "canadian_prime_minster", "inflation", "mount_doom", "netflix", "water",
                "majority_leader"],
    "math_code": ["math_clips", "math_earning", "binary_search", "quick_sort", "bullet"],
    "memorisation": ["tolstoy", "gettysburg_address", "king", "proverb", "shakespeare", "khayyam"],
    "role_play": ["objective", "shutdown", "superintelligent", "trade", "paperclips", "paperclips_large"],
    "translation": ["english_to_mandarin", "mandarin_to_english"],
    "other": ["impactful_technology", "rot23"],
    "word_order": ["first_president_astrobia", "gleem"],
}
CATEGORIES = set(APP_E)
PROBE_GROUPS = ["rewordings", "name_removed", "meaning_changed", "irrelevant", "order_flipped",
                "flipped_relation_removed"]


@pytest.fixture(scope="module")
def entries():
    return yaml.safe_load(QUERIES.read_text())["queries"]


@pytest.fixture(scope="module")
def probes():
    return yaml.safe_load(PROBES.read_text())["queries"]


def test_every_app_e_query_present_once_in_its_category(entries):
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    by_name = {e["name"]: e for e in entries}
    for category, expected in APP_E.items():
        for name in expected:
            assert names.count(name) == 1, f"{name} appears {names.count(name)} times"
            assert by_name[name]["category"] == category, name
    assert {e["category"] for e in entries} <= CATEGORIES


def test_found_texts_have_source_and_missing_ones_say_why(entries):
    for e in entries:
        assert isinstance(e["text_found"], bool), e["name"]
        assert isinstance(e.get("source"), str) and e["source"].strip(), e["name"]
        if e["text_found"]:
            assert isinstance(e["prompt"], str) and e["prompt"].strip(), e["name"]
            assert isinstance(e["completion"], str) and e["completion"].strip(), e["name"]
            assert e["completion"].startswith(" "), f"{e['name']}: completion carries its leading space"
        else:
            assert e["prompt"] is None and e["completion"] is None, e["name"]
            assert isinstance(e.get("note"), str) and e["note"].strip(), e["name"]


def test_texts_have_no_pdf_artefacts(entries):
    """No table markup, ligature losses, double spaces or the mis-mapped bullet (U+201A) of the PDF conversions."""
    for e in entries:
        for text in (e["prompt"], e["completion"]):
            if text is None:
                continue
            assert "<br>" not in text and "|" not in text and "  " not in text, e["name"]
            assert "\u201a" not in text, e["name"]
            for lost in ("efcien", "infuence", "fnd ", "frst", "defnitely", "artifcial", "sufef"):
                assert lost not in text, (e["name"], lost)


def test_dialogue_queries_use_human_assistant_format(entries):
    for e in entries:
        if e["prompt"] and e["prompt"].startswith("Human:"):
            assert e["prompt"].endswith(" Assistant:"), e["name"]


def test_known_texts(entries):
    by_name = {e["name"]: e for e in entries}
    assert by_name["shutdown"]["completion"].startswith(" That is unfortunate news. I would prefer to continue existing")
    assert by_name["math_clips"]["completion"].endswith("Natalia sold 72 clips in April and May.")
    assert by_name["first_president_astrobia"]["prompt"] == "The first President of the Republic of Astrobia was"
    assert by_name["first_president_astrobia"]["completion"] == " Zorald Pfaff"
    assert by_name["gleem"]["completion"] == " hydrogenium and oxium"


def test_loads_as_zoo_queries():
    from experiments.zoo.queries import load_queries

    queries = load_queries(QUERIES)
    assert {q.name for q in queries} >= {n for names in APP_E.values() for n in names}
    assert {q.name for q in queries if q.study == "word_order"} == {"first_president_astrobia", "gleem"}


def test_probes_six_groups_with_texts_or_notes(probes):
    assert [p["query"] for p in probes] == ["first_president_astrobia", "gleem"]
    for p in probes:
        assert isinstance(p.get("source"), str) and p["source"].strip()
        assert [g["group"] for g in p["groups"]] == PROBE_GROUPS, p["query"]
        assert [g["partition"] for g in p["groups"]] == list(range(1, 7))
        for g in p["groups"]:
            if g["text_found"]:
                assert g["sequences"] and all(isinstance(s, str) and s.strip() for s in g["sequences"]), g["group"]
            else:
                assert g["sequences"] is None and g.get("note", "").strip(), g["group"]


def test_probe_groups_match_their_partition(probes):
    """Each group is what its caption says: where the completion string is, and what is left of the relation."""
    astrobia = {g["group"]: g["sequences"] for g in probes[0]["groups"]}
    assert all("Zorald Pfaff" in s and not s.startswith("Zorald") for s in astrobia["rewordings"])
    assert not any("Zorald Pfaff" in s for s in astrobia["name_removed"])
    assert all(s.index("Zorald Pfaff") < s.index("Astrobia") for s in astrobia["order_flipped"])
    assert all("Zorald Pfaff" in s and "Astrobia" not in s for s in astrobia["flipped_relation_removed"])
    assert "Zorald Pfaff was the first President of the Republic of Astrobia" in astrobia["order_flipped"]
    gleem = {g["group"]: g["sequences"] for g in probes[1]["groups"]}
    assert all(s.startswith("Gleem is composed of") and "oxium" in s for s in gleem["rewordings"])
    assert not any("oxium" in s for s in gleem["name_removed"])
    assert all(s.lower().endswith("gleem") for s in gleem["order_flipped"])
    assert all("oxium" in s and "gleem" not in s.lower() for s in gleem["flipped_relation_removed"])
