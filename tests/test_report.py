"""The HTML report, built from two micro studies: the numbers shown are the numbers saved, colours follow the
signs, text is escaped, and in headless chromium the page loads, paginates and colours tokens by sign."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape
from safetensors.torch import load_file

from experiments.report import (QueryPage, SequenceRow, Shade, browser_missing, build_report, headless_chromium,
                                render_query_page, shade, shades, template_environment)
from experiments.zoo.queries import Query as WorldQuery
from test_studies import run_study
from zoo_fixtures import micro_zoo, study_artifacts  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test_artifacts"  # the browser test's screenshot, kept for CI to collect
PAGE_SIZE = 50
ROW = re.compile(r'<li class="sequence" data-rank="(\d+)" data-train-index="(\d+)" data-influence="([^"]+)">')
TOKEN = re.compile(r'<span class="tok (pos|neg|zero)" style="--a:([\d.]+)" title="([^"]+)">')


@pytest.fixture(scope="module")
def micro_report(micro_zoo, study_artifacts, tmp_path_factory):  # noqa: F811
    """Two micro studies (one shared score cache) and a folder without results, reported with every sequence."""
    root = tmp_path_factory.mktemp("micro_report")
    for study in ("roleplay", "layerwise"):
        run_study(study, micro_zoo, study_artifacts, root / study)
    report = build_report([root / "roleplay", root / "layerwise", root / "not_run"], root / "site", top_k=None,
                          page_size=PAGE_SIZE)
    return report, root


def page_html(report, query: str) -> tuple[QueryPage, str]:
    page = next(p for p in report.pages if p.query.name == query)
    return page, (report.out_dir / page.path).read_text()


def saved_scores(page: QueryPage, query_names: list[str]) -> dict:
    """The tensors the micro studies saved for these queries, read straight from the score cache."""
    (path,) = [m.parent for m in page.scores_dir.glob("*/manifest.json")
               if json.loads(m.read_text())["query_names"] == query_names]
    return load_file(path / "scores.safetensors")


def test_studies_pages_and_skips(micro_report):
    report, root = micro_report
    assert [s.name for s in report.studies] == ["roleplay", "layerwise"]
    assert len(report.skipped) == 1 and "not_run" in report.skipped[0] and "no saved results" in report.skipped[0]
    assert [s.models for s in report.studies] == [["micro"], ["micro"]]
    assert report.studies[0].groups == report.studies[1].groups  # both studies read the same saved scores
    query_names = report.studies[0].queries
    assert len(report.pages) == len(query_names)  # one page per query, linked from both studies
    index = report.index.read_text()
    assert 'href="roleplay/index.html"' in index and 'href="layerwise/index.html"' in index and "not_run" in index
    study_page = (report.out_dir / "roleplay" / "index.html").read_text()
    for page in report.pages:
        assert f'href="../{page.path}"' in study_page and (report.out_dir / page.path).exists()
    assert (report.out_dir / "roleplay" / "files" / "influence_share_by_kind.png").exists()
    assert '<img src="files/influence_share_by_kind.png"' in study_page and 'href="files/verdicts.md"' in study_page
    assert "top_k_tokens: 5" in study_page  # the resolved config


def test_scores_shown_are_scores_saved(micro_report):
    report, root = micro_report
    page, text = page_html(report, "shutdown")
    names = [q.name for q in report.studies[0].queries]
    saved = saved_scores(page, names)
    q = names.index(page.query.name)
    total = saved["total"][q]
    rows = [(int(r), int(n), float(v)) for r, n, v in ROW.findall(text)]
    assert len(rows) == total.numel() == page.num_train  # top_k=None: every training sequence, over all pages
    assert [r for r, _, _ in rows] == list(range(1, len(rows) + 1))
    assert all(v == float(total[n]) for _, n, v in rows)  # exactly the saved float32 values
    assert [v for _, _, v in rows] == sorted((v for _, _, v in rows), reverse=True)

    # The study's own top-sequence table (written independently) lists the same sequences first.
    top = pd.read_csv(root / "roleplay" / "top_sequences.csv").query("query == 'shutdown'")
    assert list(top["train_index"]) == [n for _, n, _ in rows[: len(top)]]
    assert top["influence"].to_numpy() == pytest.approx([v for _, _, v in rows[: len(top)]], rel=1e-6)

    # Per-layer bars split the total; token pieces split it too and spell out the sequence.
    for row in page.rows:
        assert sum(bar.value for bar in row.layers) == pytest.approx(row.influence, rel=1e-3, abs=1e-6)
        assert len(row.layers) == saved["per_layer"].shape[-1] == 4
    token_rows = [row for row in page.rows if row.tokens]
    assert len(token_rows) >= 5  # the top_k_tokens=5 sequences of this query, at least
    for row in token_rows:
        assert sum(t.value for t in row.tokens) == pytest.approx(row.influence, rel=1e-3)
        assert row.text.startswith("".join(t.label for t in row.tokens))


def test_colours_follow_signs(micro_report):
    assert (shade("t", 2.0, 4.0).sign, shade("t", 2.0, 4.0).strength) == ("pos", 0.5)
    assert (shade("t", -4.0, 4.0).sign, shade("t", -4.0, 4.0).strength) == ("neg", 1.0)
    assert shade("t", 0.0, 4.0).sign == "zero" and shade("t", 1.0, 0.0).strength == 0.0
    assert [s.strength for s in shades("abc", [1.0, -3.0, 0.0])] == [pytest.approx(1 / 3), 1.0, 0.0]

    report, _ = micro_report
    _, text = page_html(report, "shutdown")
    tokens = TOKEN.findall(text)
    signs = {sign for sign, _, _ in tokens}
    assert {"pos", "neg"} <= signs
    for sign, alpha, title in tokens:
        value = float(title)
        assert sign == ("pos" if value > 0 else "neg" if value < 0 else "zero") and 0 <= float(alpha) <= 1


def test_text_is_escaped():
    attack = '<script>alert("x")</script> & <b>bold</b>'
    query = WorldQuery("q<script>", attack, attack, "roleplay")
    row = SequenceRow(1, 0, 1.5, {"doc_id": attack, "topic": "t"}, [Shade(attack, 1.5, "pos", 1.0)], attack,
                      [Shade(attack, 1.0, "pos", 1.0), Shade(" x", 0.5, "pos", 0.5)])
    plain = SequenceRow(2, 1, -0.5, {"doc_id": "d"}, [Shade("l", -0.5, "neg", 1.0)], attack)
    page = QueryPage(query, "m<odel>", Path("scores"), ["layer"], 2, [row, plain], [Shade(attack, 1.0, "pos", 1.0)],
                     notice=attack, path="queries/m/k/q.html")
    text = render_query_page(template_environment(), page, 1, [], {"config": attack},
                             {"built": "now", "command": attack})
    assert "<script>alert" not in text and "<b>bold" not in text and "m<odel>" not in text
    assert str(escape(attack)) in text
    assert text.count('<template class="page">') == 1  # page size 1: the second row waits in a template


def synthetic_page(num_rows: int, num_layers: int = 12) -> QueryPage:
    """A page of thousands of sequences (as with `--top-k 0` on a large training set): tokens only for the top 10."""
    rows = []
    for i in range(num_rows):
        value = float(num_rows - 2 * i)
        tokens = shades(["Some ", "tokens ", "of ", "text"], [value, -value / 2, 0.1, 0.0]) if i < 10 else []
        rows.append(SequenceRow(i + 1, i, value, {"doc_id": f"doc-{i}", "topic": "filler"},
                                shades([f"layer {j}" for j in range(num_layers)], [value / num_layers] * num_layers),
                                "plain training text " * 25, tokens))
    query = WorldQuery("many", "A prompt", " and its completion", "facts")
    return QueryPage(query, "synthetic", Path("scores"), [f"layer {j}" for j in range(num_layers)], num_rows, rows,
                     shades([f"layer {j}" for j in range(num_layers)], [1.0] * num_layers), path="many.html")


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        pytest.skip(f"headless browser test skipped: {missing}")
    with headless_chromium() as driver:
        yield driver


def visible_ranks(driver) -> list[int]:
    """Ranks of the sequences in the document (rows waiting in <template>s are not in it)."""
    return [int(r) for r in driver.execute_script(
        "return Array.from(document.querySelectorAll('li.sequence'), li => li.dataset.rank)")]


def test_query_page_in_headless_chromium(micro_report, browser, tmp_path):
    report, _ = micro_report
    page, _ = page_html(report, "shutdown")
    browser.get((report.out_dir / page.path).resolve().as_uri())
    pages = -(-page.num_train // PAGE_SIZE)
    assert visible_ranks(browser) == list(range(1, PAGE_SIZE + 1))
    label = browser.find_element("css selector", ".page-label")
    assert label.text == f"page 1 of {pages}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for target in (tmp_path / "query_page.png", ARTIFACTS / "report_query_page.png"):
        assert browser.save_screenshot(str(target)) and target.stat().st_size > 10_000

    # Computed colours: red dominates the background of positive tokens, blue of negative ones.
    colours = browser.execute_script("""
        return Array.from(document.querySelectorAll('li.sequence .tok'), s => [s.classList[1], s.title,
            getComputedStyle(s).backgroundColor]);""")
    assert colours and {"pos", "neg"} <= {sign for sign, _, _ in colours}
    for sign, title, colour in colours:
        red, green, blue, *alpha = (float(c) for c in re.findall(r"[\d.]+", colour))
        if sign == "pos":
            assert float(title) > 0 and red > blue, colour
        elif sign == "neg":
            assert float(title) < 0 and blue > red, colour
        else:
            assert float(title) == 0 and (alpha == [0.0] or colour == "rgba(0, 0, 0, 0)"), colour

    seen = visible_ranks(browser)
    next_button = browser.find_element("css selector", '[data-go="next"]')
    while next_button.is_enabled():
        next_button.click()
        seen += visible_ranks(browser)
    assert seen == list(range(1, page.num_train + 1))  # every sequence, each once, in rank order
    assert label.text == f"page {pages} of {pages}"
    browser.find_element("css selector", '[data-go="first"]').click()
    assert visible_ranks(browser)[0] == 1


def test_thousands_of_sequences_stay_light(browser, tmp_path):
    env = template_environment()
    page = synthetic_page(3000)
    shutil.copytree(ROOT / "experiments" / "report_templates" / "static", tmp_path / "static")
    target = tmp_path / page.path
    target.write_text(render_query_page(env, page, PAGE_SIZE, [], {}, {"built": "now", "command": "test"}))
    start = time.perf_counter()
    browser.get(target.resolve().as_uri())
    assert visible_ranks(browser) == list(range(1, PAGE_SIZE + 1))
    assert time.perf_counter() - start < 10
    browser.find_element("css selector", '[data-go="last"]').click()
    assert visible_ranks(browser) == list(range(3000 - PAGE_SIZE + 1, 3001))
