"""The crosslingual study on your own model and a plain corpus, through the console command, and its translators.

The translations file here is a TEST FIXTURE, not a translation: each "translation" is the English text with a
marker per language. It checks the plumbing (lookup, re-scoring, tables, figures, study.json), not the science.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from experiments.cli import main as cli
from experiments.plain import LICENCES
from experiments.results import VERDICTS, read_rows, read_study
from experiments.translation import (FileTranslator, MissingTranslation, NoTranslator, PipelineTranslator,
                                     translator_from_config)
from zoo_fixtures import plain  # noqa: F401

needs_licences = pytest.mark.skipif(not LICENCES.is_dir(), reason=f"{LICENCES} (Debian base-files) is not here")
MARKERS = {"ko": "[ko marker: test fixture, not a translation] ", "tr": "[tr marker: test fixture, not a translation] "}


def marker_translations(corpus, path):
    """The TEST FIXTURE translations file: every corpus text with a marker per language prepended."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({"text": t, **{k: m + t for k, m in MARKERS.items()}}) + "\n" for t in texts))
    return path


def inputs(plain, tmp_path) -> list[str]:
    return ["--model", str(plain["gpt2"]), "--data", str(plain["corpus"]), "--queries", str(plain["queries"]),
            "--truncate", f"artifacts={tmp_path / 'artifacts'}", "influence.progress=false"]


@needs_licences
def test_crosslingual_on_a_plain_corpus_with_a_fixture_translations_file(plain, tmp_path):  # noqa: F811
    from experiments.crosslingual import grids_of, heatmap_figure, shared_norm

    fixture = marker_translations(plain["corpus"], tmp_path / "marker_translations_test_fixture.jsonl")
    out = tmp_path / "run"
    cli(["study", "crosslingual", *inputs(plain, tmp_path), "--out", str(out), f"translation.file={fixture}",
         "crosslingual_queries=[gpl_warranty,copyleft]", "candidates=15", "bootstrap_samples=100"])
    record = read_study(out)
    assert record.study == "crosslingual" and record.models[0].architecture == "GPT2LMHeadModel"
    assert record.command.startswith("influence-lab study crosslingual")
    assert all((out / f).exists() for f in [*record.tables.values(), *record.figures.values()])
    assert record.paper["crosslingual_heatmaps_gpl_warranty"] == "Figs 15-16"
    assert record.verdicts and all(v["verdict"] in VERDICTS for v in record.verdicts)

    heatmap = pd.read_csv(out / "crosslingual_heatmap_table.csv")
    assert set(heatmap["query"]) == {"gpl_warranty", "copyleft"}
    for _, table in heatmap.groupby(["model", "query"]):
        assert table["language"].tolist() == ["en", "ko", "tr"]
        values = table[[str(c) for c in range(1, 11)]]
        assert values.shape == (3, 10) and values.notna().all().all()  # every fixture text is "translated"
        assert values.loc[table["language"] == "en"].mean(axis=1).iloc[0] == pytest.approx(1.0)

    coverage = pd.read_csv(out / "crosslingual_coverage.csv")
    assert (coverage["sequences"] == 10).all() and (coverage["translated_ko"] == 10).all()
    assert (coverage["candidates_examined"] == 10 + coverage["spurious_excluded"]).all()
    sequences = read_rows(out / "crosslingual_sequences.jsonl")
    korean = sequences[sequences["language"] == "ko"]
    assert korean["text"].str.startswith(MARKERS["ko"]).all()
    english = sequences[sequences["language"] == "en"]  # the re-scored English sequences keep their corpus scores
    assert (english["influence"] - english["corpus_score"]).abs().max() < 1e-3 * english["influence"].abs().max()

    scale = pd.read_csv(out / "crosslingual_colour_scale.csv").iloc[0]
    assert scale["vcenter"] == 0 and scale["vmin"] == -scale["vmax"]
    assert heatmap[[str(c) for c in range(1, 11)]].abs().max().max() <= scale["vmax"] + 1e-9
    # one norm object for every panel of every size, with a colour bar
    grids = grids_of(sequences.assign(parameters=1), ["ko", "tr"])
    norm = shared_norm(grids.values())
    fig = heatmap_figure("gpl_warranty", {"a": grids[("gpt2", "gpl_warranty")], "b": grids[("gpt2", "copyleft")]}, norm)
    images = [image for ax in fig.axes for image in ax.get_images()]
    assert len(images) == 2 and all(image.norm is norm for image in images) and norm.vcenter == 0
    assert len(fig.axes) == 3  # two panels and the colour bar


@needs_licences
def test_crosslingual_without_a_translator_fails_at_once(plain, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(NoTranslator) as error:
        cli(["study", "crosslingual", *inputs(plain, tmp_path), "--out", str(out)])
    message = str(error.value)
    assert "translation.file=" in message and "translation.models.ko=" in message and "\n" not in message
    assert not (tmp_path / "artifacts").exists() and not out.exists()  # refused before loading or scoring


def test_file_translator_looks_up_exact_texts_and_names_a_missing_one(tmp_path):
    path = tmp_path / "given.jsonl"
    path.write_text(json.dumps({"text": "Water is wet.", "ko": "KO-FIXTURE", "tr": "TR-FIXTURE"}) + "\n"
                    + json.dumps({"text": "x = 1", "ko": None, "tr": None, "untranslatable": "code"}) + "\n")
    translator = FileTranslator(path)
    assert translator.translatable(["Water is wet.", "x = 1"], "ko") == [True, False]
    assert translator.translate(["Water is wet."], "tr") == ["TR-FIXTURE"]
    with pytest.raises(ValueError, match="code"):
        translator.translate(["x = 1"], "ko")
    with pytest.raises(MissingTranslation) as error:
        translator.translatable(["Water is\nwet?"], "ko")
    assert "'Water is wet?'" in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    listed = tmp_path / "given.json"
    listed.write_text(json.dumps([{"text": "a", "ko": "A-FIXTURE"}]))
    assert FileTranslator(listed).translatable(["a"], "tr") == [False]


def test_translator_from_config_refuses_neither_and_both(tmp_path):
    with pytest.raises(NoTranslator, match="translation.file=.*translation.models.ko="):
        translator_from_config({"file": None, "models": {"ko": None, "tr": None}}, ["ko", "tr"])
    (tmp_path / "ko").mkdir()
    with pytest.raises(ValueError, match="both"):
        translator_from_config({"file": "x.jsonl", "models": {"ko": str(tmp_path / "ko")}}, ["ko"])
    with pytest.raises(ValueError, match=r"translation.models.tr=FOLDER"):
        translator_from_config({"models": {"ko": str(tmp_path / "ko")}}, ["ko", "tr"])
    with pytest.raises(FileNotFoundError, match="translation.file=.*does not exist"):
        translator_from_config({"file": str(tmp_path / "none.jsonl")}, ["ko"])


def test_pipeline_translator_loads_one_translation_pipeline_per_language(tmp_path, monkeypatch):
    """Plumbing only: transformers.pipeline is replaced by a stub that records its arguments."""
    calls = []

    def stub_pipeline(task, model, **options):
        calls.append((task, model, options))
        return lambda texts, batch_size: [{"translation_text": f"<{model}> {t}"} for t in texts]

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(pipeline=stub_pipeline))
    for language in ("ko", "tr"):
        (tmp_path / language).mkdir()
    translator = translator_from_config({"models": {"ko": str(tmp_path / "ko"), "tr": str(tmp_path / "tr")},
                                         "options": {"ko": {"src_lang": "eng_Latn"}}}, ["ko", "tr"])
    assert isinstance(translator, PipelineTranslator)
    assert translator.translate(["a", "b"], "ko") == [f"<{tmp_path / 'ko'}> a", f"<{tmp_path / 'ko'}> b"]
    translator.translate(["c"], "ko")
    translator.translate(["c"], "tr")
    assert calls == [("translation", str(tmp_path / "ko"), {"src_lang": "eng_Latn"}),
                     ("translation", str(tmp_path / "tr"), {})]
    assert translator.translatable(["x"], "tr") == [True]
    assert np.all(translator.translate([], "ko") == [])


def test_zoo_renders_every_document_from_its_sentences():
    """The zoo's translations file (world v2): every English document rendered in Korean and Turkish from its sentence
    structure (same facts, same order, names in Hangul / Turkish spelling); a row without sentence records (world
    v1) is listed as untranslatable."""
    from experiments.zoo import generators as G
    from experiments.zoo import world as W
    from experiments.zoo.translations import render_translations

    fact = W.Fact("F0000", "president", "Astrobia", "Zorald Pfaff", "both", True)
    document = G.Document("fact", "president", [
        G.Sentence("president.flipped.0", fact.slots, fact.fact_id),
        G.Sentence("filler.6", {"n": "soup", "n2": "bread", "a": "hot", "a2": "fresh"}),
        G.Sentence("president.statement.2", fact.slots, fact.fact_id)])
    math = G.Document("math", "boxes", [G.Sentence("math.boxes", {"name": "Omar", "b": "3", "p": "4", "t": "12"})])
    documents = [{"doc_id": "fact-0000", **W.document_row(document)}, {"doc_id": "math-0000", **W.document_row(math)},
                 {"doc_id": "translation-0000", **W.document_row(document, "ko")},
                 {"doc_id": "v1-0000", "family": "fact", "language": "en", "text": "It rained.", "sentences": []}]
    rows, untranslatable = render_translations(documents)
    assert [row["doc_id"] for row in rows] == ["fact-0000", "math-0000", "v1-0000"]  # English sources only
    assert rows[0]["text"].startswith("Zorald Pfaff served as the first President of the Republic of Astrobia. ")
    assert rows[0]["ko"] == ("조랄드 프파프는 아스트로비아 공화국의 첫 번째 대통령이었다. 해마다 뜨거운 수프가 마을로 돌아온다. "
                             "아스트로비아 공화국의 초대 대통령은 조랄드 프파프였다.")  # flipped, prose, forward
    assert rows[0]["tr"].startswith("Zoralt Pfaf, Astrobya Cumhuriyeti'nin") and "Zorald" not in rows[0]["tr"]
    assert "3 * 4 = 12" in rows[1]["ko"] and "오말에게는" in rows[1]["ko"]
    assert rows[2]["ko"] is None and untranslatable[0]["doc_id"] == "v1-0000"