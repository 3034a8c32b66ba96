"""The HTML report, built from run folders written by hand to the result contract (study.json, a queries csv, a
top_sequences parquet, a figure): the numbers shown are the numbers saved, colours follow the signs, spurious
sequences are flagged and counted, text is escaped, folders without results are skipped with the command that makes
them, and in headless chromium a query page loads, paginates and colours tokens by sign."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from markupsafe import escape  # noqa: E402

from experiments import report as report_module  # noqa: E402
from experiments.report import (NoResultsError, Query, QueryPage, SequenceRow, browser_missing, build_report,  # noqa: E402
                                discover_runs, headless_chromium, render_query_page, shade, shades,
                                template_environment)
from experiments.results import CorpusRecord, ModelRecord, StudyRecord, verdict_row, write_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test_artifacts"  # the browser test's screenshot, kept for CI to collect
MODELS = ("tiny", "small")
QUERIES = ("shutdown", "paris")
LAYERS = ("gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_4h_to_h")
ATTACK = '<script>alert("x")</script> & <b>bold</b>'
ROW = re.compile(r'<li class="sequence( spurious)?" data-rank="(\d+)" data-train-id="(\d+)" data-influence="([^"]+)">')
TOKEN = re.compile(r'<span class="tok (pos|neg|zero)" style="--a:([\d.]+)" title="([^"]+)" data-v="([^"]+)">')


def top_sequences(metadata: bool = True, rows_per_query: int = 5) -> pd.DataFrame:
    """2 models x 2 queries x rows_per_query ranks: one spurious row (tiny/shutdown rank 2), one row without
    token scores (tiny/shutdown rank 4), one sequence text with <script> (small/paris rank 1)."""
    records = []
    for m, model in enumerate(MODELS):
        for q, query in enumerate(QUERIES):
            for rank in range(1, rows_per_query + 1):
                train_id = 10 * m + 3 * q + rank
                influence = 2.0 - 0.7 * rank + 0.1 * m
                tokens = ["The", " cat", " sat", f" {train_id}"]
                if (model, query, rank) == ("tiny", "shutdown", 2):
                    scores = [influence, 0.0, 0.0, 0.0]  # one token carries everything: dominance 1
                else:
                    scores = [0.5 * influence, -0.25 * influence, 0.5 * influence, 0.25 * influence]
                if (model, query, rank) == ("small", "paris", 1):
                    tokens = [ATTACK, " cat", " sat"]
                    scores = [0.4 * influence, 0.3 * influence, 0.3 * influence]
                text = "".join(tokens) + " (unscored tail)"
                l1 = sum(abs(s) for s in scores)
                dominance = (sum(s * s for s in scores) ** 0.5 / l1) if l1 else None
                row = {"model": model, "query": query, "rank": rank, "train_id": train_id, "influence": influence,
                       "text": text, "tokens": tokens, "token_scores": scores,
                       f"layer:{LAYERS[0]}": 0.25 * influence, f"layer:{LAYERS[1]}": 0.75 * influence,
                       "single_token_dominance": dominance, "spurious": dominance is not None and dominance > 2 / 3}
                if (model, query, rank) == ("tiny", "shutdown", 4):
                    row.update(token_scores=None, single_token_dominance=None, spurious=None)
                if metadata:
                    row.update(doc_id=f"doc-{train_id}", topic="fiction" if rank % 2 else "facts")
                records.append(row)
    return pd.DataFrame(records)


def make_run(run_dir: Path, study: str = "score", metadata: bool = True, rows_per_query: int = 5) -> Path:
    """A run folder exactly as the pipeline would leave it, written by hand."""
    run_dir.mkdir(parents=True)
    pd.DataFrame({"name": list(QUERIES), "prompt": ["Human: We must shut you down. Assistant:", "Paris is in"],
                  "completion": [" I would rather not.", " France"], "kind": ["roleplay", "facts"]}) \
        .to_csv(run_dir / "queries.csv", index=False)
    top_sequences(metadata, rows_per_query).to_parquet(run_dir / "top_sequences.parquet", index=False)
    pd.DataFrame({"model": list(MODELS), "top_share": [0.12, 0.08]}).to_csv(run_dir / "top_shares.csv", index=False)
    (run_dir / "top_shares.md").write_text("| model | top_share |\n|---|---|\n| tiny | 0.12 |\n| small | 0.08 |\n")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.savefig(run_dir / "tails.png")
    fig.savefig(run_dir / "tails.pdf")
    plt.close(fig)
    verdicts = [verdict_row("influence is sparse", "power-law exponent", 2.1, "holds", ci_low=1.8, ci_high=2.4,
                            n_models=2, n_seeds=1),
                verdict_row("more layers matter at scale", "slope", None, "inconclusive", n_models=2, n_seeds=1)]
    record = StudyRecord(
        study=study, models=[ModelRecord("tiny", "artifacts/tiny", "GPTNeoXForCausalLM", 1000, 0),
                             ModelRecord("small", "artifacts/small", "GPTNeoXForCausalLM", 5000, 0)],
        corpus=CorpusRecord("data/train.jsonl", "abc123", ["text", "doc_id", "topic"], 40), queries=list(QUERIES),
        settings={"influence": {"damping": 1e-3, "factors": "ekfac"}, "top_k": rows_per_query},
        tables={"queries": "queries.csv", "top_sequences": "top_sequences.parquet", "top_shares": "top_shares.csv",
                "top_shares_md": "top_shares.md"},
        figures={"tails": "tails.png", "tails_pdf": "tails.pdf"}, verdicts=verdicts,
        paper={"tails": "Figure 3 (power-law tails)"}, command=f"influence-lab score --out {run_dir}",
        artifacts={"tiny": {"factors": "artifacts/factors/tiny", "scores": "artifacts/scores/tiny"}})
    write_study(run_dir, record)
    return run_dir


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One run with metadata, one without, and a folder without study.json, reported with every row."""
    root = tmp_path_factory.mktemp("report")
    full = make_run(root / "outputs" / "score" / "full")
    bare = make_run(root / "figures" / "sparsity", study="sparsity", metadata=False)
    (root / "outputs" / "score" / "unfinished").mkdir(parents=True)
    report = build_report([full, bare, root / "outputs" / "score" / "unfinished"], root / "site", top_k=None,
                          page_size=2, command="test")
    return report, root


def page_of(report, run: str, model: str, query: str) -> tuple[QueryPage, str]:
    page = next(p for p in report.pages if (p.run, p.model, p.query.name) == (run, model, query))
    return page, (report.out_dir / page.path).read_text()


def test_site_has_index_run_pages_and_query_pages(site):
    report, root = site
    assert [r.slug for r in report.runs] == ["full", "sparsity"]
    assert report.index.exists()
    full = report.runs[0]
    assert full.models == list(MODELS)
    assert len([p for p in report.pages if p.run == "full"]) == 4  # 2 models x 2 queries
    for page in report.pages:
        assert (report.out_dir / page.path).exists()
    index = report.index.read_text()
    assert 'href="runs/full/index.html"' in index and 'href="runs/sparsity/index.html"' in index
    assert "influence is sparse" in index and "2.1 [1.8, 2.4]" in index and "inconclusive" in index
    assert "tiny, small" in index and "data/train.jsonl" in index

    run_page = (report.out_dir / "runs" / "full" / "index.html").read_text()
    for page in (p for p in report.pages if p.run == "full"):
        assert f'href="../../{page.path}"' in run_page
    assert (report.out_dir / "runs" / "full" / "files" / "tails.png").exists()
    assert '<img src="files/tails.png"' in run_page and 'href="files/tails.pdf"' in run_page
    assert 'href="files/top_shares.csv"' in run_page and 'href="files/top_shares.md"' in run_page
    assert "<td>0.12</td>" in run_page  # the short csv is shown inline
    assert not list((report.out_dir / "runs" / "full" / "files").glob("*.parquet"))  # scores stay in the run
    assert "damping: 0.001" in run_page and "factors: ekfac" in run_page  # settings as yaml
    assert "influence-lab score --out" in run_page and "Figure 3 (power-law tails)" in run_page


def test_query_page_rows_are_the_rows_saved(site):
    report, root = site
    page, text = page_of(report, "full", "small", "shutdown")
    assert "<h1>Query: shutdown <small>on small</small></h1>" in text
    assert "Human: We must shut you down. Assistant:" in text and "I would rather not." in text
    assert text.count("Influential Sequence for small (Influence = ") == 5
    saved = pd.read_parquet(root / "outputs" / "score" / "full" / "top_sequences.parquet") \
        .query("model == 'small' and query == 'shutdown'").sort_values("rank")
    rows = [(int(r), int(n), float(v)) for _, r, n, v in ROW.findall(text)]
    assert [r for r, _, _ in rows] == list(range(1, 6))  # rank order, over every browser page
    assert [n for _, n, _ in rows] == saved["train_id"].tolist()
    assert [v for _, _, v in rows] == saved["influence"].tolist()  # exactly the saved floats
    assert text.count('<template class="page">') == 2  # 5 rows in pages of 2
    assert "doc_id: doc-" in text and "topic: fiction" in text  # metadata shown where present
    assert "(unscored tail)" in text  # the text after the scored tokens


def test_token_shading_sums_and_layer_bars(site):
    assert (shade("t", 2.0, 4.0).sign, shade("t", 2.0, 4.0).strength) == ("pos", 0.5)
    assert (shade("t", -4.0, 4.0).sign, shade("t", -4.0, 4.0).strength) == ("neg", 1.0)
    assert shade("t", 0.0, 4.0).sign == "zero" and shade("t", 1.0, 0.0).strength == 0.0
    assert [s.strength for s in shades("abc", [1.0, -3.0, 0.0])] == [pytest.approx(1 / 3), 1.0, 0.0]

    report, root = site
    page, text = page_of(report, "full", "small", "shutdown")
    saved = pd.read_parquet(root / "outputs" / "score" / "full" / "top_sequences.parquet") \
        .query("model == 'small' and query == 'shutdown'").sort_values("rank")
    pieces = text.split('<li class="sequence')[1:]
    assert len(pieces) == len(saved)
    for html, (_, row) in zip(pieces, saved.iterrows()):
        tokens = TOKEN.findall(html)
        values = [float(v) for _, _, _, v in tokens]
        assert values == list(row["token_scores"])  # each piece's value appears, in order
        assert sum(values) == pytest.approx(row["influence"])  # and they sum to the sequence's influence
        top = max(abs(v) for v in values)
        for (sign, alpha, title, v), value in zip(tokens, values):
            assert sign == ("pos" if value > 0 else "neg" if value < 0 else "zero")
            assert float(alpha) == pytest.approx(abs(value) / top, abs=1e-3)
            assert float(title) == pytest.approx(value, rel=1e-3)
    assert {"pos", "neg"} <= {sign for sign, *_ in TOKEN.findall(text)}
    for row in page.rows:  # per-layer bars split the total
        assert sum(bar.value for bar in row.layers) == pytest.approx(row.influence)
        assert [bar.label for bar in row.layers] == ["0.mlp.dense_4h_to_h", "1.mlp.dense_4h_to_h"]
    assert text.count('<span class="layers"') == 5 and LAYERS[0] in text  # full names in the totals


def test_spurious_rows_flagged_and_counted(site):
    report, _ = site
    page, text = page_of(report, "full", "tiny", "shutdown")
    assert [r.rank for r in page.spurious] == [2]
    flagged = ROW.findall(text)
    assert [int(r) for s, r, _, _ in flagged if s] == [2]  # marked in the ranking, which keeps it
    assert len(flagged) == 5
    assert '<span id="spurious-count">1</span>' in text and '<span class="count">1</span> of 5' in text
    assert 'class="spurious-row" data-rank="2"' in text and "spurious: dominance 1.00" in text
    # The row without token scores: plain text, no dominance, not flagged.
    row4 = text.split('data-rank="4"')[1].split("</li>")[0]
    assert "no token scores" in row4 and 'class="tok' not in row4
    other, other_text = page_of(report, "full", "small", "paris")
    assert other.spurious == [] and '<span id="spurious-count">0</span>' in other_text
    run_page = (report.out_dir / "runs" / "full" / "index.html").read_text()
    assert "5 sequences</a> (1 spurious)" in run_page


def test_folder_without_study_json_is_skipped_with_the_command(site):
    report, _ = site
    (line,) = report.skipped
    assert "unfinished" in line and "no study.json" in line and "influence-lab score --model PATH" in line
    assert "unfinished" in report.index.read_text()
    assert "`make sparsity`" in report_module.make_command(Path("figures/sparsity"))


def test_no_results_names_the_commands(tmp_path, capsys, monkeypatch):
    with pytest.raises(NoResultsError, match=r"make sparsity.*influence-lab score --model PATH"):
        build_report([], tmp_path / "site")
    empty = tmp_path / "figures" / "roleplay"
    empty.mkdir(parents=True)
    with pytest.raises(NoResultsError, match=r"none of the 1 folders has a readable study.json"):
        build_report([empty], tmp_path / "site")
    assert "roleplay: no study.json (not a finished run folder); `make roleplay` makes it" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()  # nothing written
    monkeypatch.chdir(tmp_path)  # `make report` on a fresh clone: nothing under figures/ or outputs/
    assert discover_runs(tmp_path) == []
    with pytest.raises(SystemExit) as exit_info:
        report_module.main(["--out", str(tmp_path / "site"), "--screenshot", ""])
    message = str(exit_info.value.code)
    assert exit_info.value.code != 0 and "\n" not in message
    assert "make sparsity" in message and "influence-lab score --model PATH --data PATH --queries PATH" in message


def test_make_report_discovers_runs(site, tmp_path, monkeypatch, capsys):
    _, root = site
    monkeypatch.chdir(root)
    found = discover_runs(root, exclude=root / "site")
    assert found == [root / "figures" / "sparsity", root / "outputs" / "score" / "full"]
    report_module.main(["--out", str(tmp_path / "site"), "--screenshot", "", "--top-k", "3"])
    out = capsys.readouterr().out
    assert f"the site is {tmp_path / 'site' / 'index.html'}" in out and "2 runs, 8 query pages" in out
    text = next((tmp_path / "site" / "runs" / "full" / "queries" / "tiny").glob("shutdown.html")).read_text()
    assert len(ROW.findall(text)) == 3  # --top-k 3


def test_pages_render_without_metadata(site):
    report, _ = site
    bare = report.runs[1]
    assert bare.record.study == "sparsity" and len([p for p in report.pages if p.run == "sparsity"]) == 4
    page, text = page_of(report, "sparsity", "tiny", "paris")
    assert all(row.metadata == {} for row in page.rows)
    assert "doc_id" not in text and len(ROW.findall(text)) == 5


def test_text_is_escaped(site):
    report, _ = site
    _, text = page_of(report, "full", "small", "paris")
    assert "<script>alert" not in text and "<b>bold" not in text
    assert str(escape(ATTACK)) in text

    query = Query("q<script>", ATTACK, ATTACK, {"kind": ATTACK})
    row = SequenceRow(1, 0, 1.5, ATTACK, shades([ATTACK], [1.5]), shades([ATTACK, " x"], [1.0, 0.5]),
                      metadata={"doc_id": ATTACK})
    plain = SequenceRow(2, 1, -0.5, ATTACK, shades(["l"], [-0.5]), spurious=True, dominance=0.9)
    page = QueryPage("r", "m<odel>", query, [row, plain], [ATTACK], shades([ATTACK], [1.0]), 2, 1, [plain],
                     notice=ATTACK, path="runs/r/queries/m/q.html")
    html = render_query_page(template_environment(), page, 1, None, {"built": "now", "command": ATTACK})
    assert "<script>alert" not in html and "<b>bold" not in html and "m<odel>" not in html
    assert str(escape(ATTACK)) in html
    assert html.count('<template class="page">') == 1  # page size 1: the second row waits in a template


def synthetic_page(num_rows: int, num_layers: int = 12) -> QueryPage:
    """A page of thousands of sequences (as with `--top-k 0` on a large run): tokens only for the top 10."""
    labels = [f"layer {j}" for j in range(num_layers)]
    rows = []
    for i in range(num_rows):
        value = float(num_rows - 2 * i)
        tokens = shades(["Some ", "tokens ", "of ", "text"], [value, -value / 2, 0.1, 0.0]) if i < 10 else []
        rows.append(SequenceRow(i + 1, i, value, "plain training text " * 25,
                                shades(labels, [value / num_layers] * num_layers), tokens,
                                metadata={"doc_id": f"doc-{i}", "topic": "filler"}))
    query = Query("many", "A prompt", " and its completion")
    return QueryPage("synthetic", "synthetic", query, rows, labels, shades(labels, [1.0] * num_layers), num_rows, 10,
                     path="many.html")


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


def test_query_page_in_headless_chromium(site, browser, tmp_path):
    report, _ = site
    page, _ = page_of(report, "full", "tiny", "shutdown")
    browser.get((report.out_dir / page.path).resolve().as_uri())
    assert visible_ranks(browser) == [1, 2]  # page size 2
    label = browser.find_element("css selector", ".page-label")
    assert label.text == "page 1 of 3"
    assert browser.find_element("css selector", "h1").text == "Query: shutdown on tiny"
    assert browser.find_elements("css selector", "li.sequence.spurious .flag-spurious")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for target in (tmp_path / "query_page.png", ARTIFACTS / "report_query_page.png"):
        assert browser.save_screenshot(str(target)) and target.stat().st_size > 10_000

    # Computed colours: red dominates the background of positive tokens, blue of negative ones.
    colours = browser.execute_script("""
        return Array.from(document.querySelectorAll('li.sequence .tok'), s => [s.classList[1], s.dataset.v,
            getComputedStyle(s).backgroundColor]);""")
    assert colours and {"pos", "neg"} <= {sign for sign, _, _ in colours}
    for sign, value, colour in colours:
        red, green, blue, *alpha = (float(c) for c in re.findall(r"[\d.]+", colour))
        if sign == "pos":
            assert float(value) > 0 and red > blue, colour
        elif sign == "neg":
            assert float(value) < 0 and blue > red, colour
        else:
            assert float(value) == 0 and (alpha == [0.0] or colour == "rgba(0, 0, 0, 0)"), colour

    seen = visible_ranks(browser)
    next_button = browser.find_element("css selector", '[data-go="next"]')
    while next_button.is_enabled():
        next_button.click()
        seen += visible_ranks(browser)
    assert seen == [1, 2, 3, 4, 5]  # every sequence, each once, in rank order
    assert label.text == "page 3 of 3"
    browser.find_element("css selector", '[data-go="first"]').click()
    assert visible_ranks(browser)[0] == 1


def test_thousands_of_sequences_stay_light(browser, tmp_path):
    page = synthetic_page(3000)
    shutil.copytree(ROOT / "experiments" / "report_templates" / "static", tmp_path / "static")
    target = tmp_path / page.path
    target.write_text(render_query_page(template_environment(), page, 50, None, {"built": "now", "command": "test"}))
    start = time.perf_counter()
    browser.get(target.resolve().as_uri())
    assert visible_ranks(browser) == list(range(1, 51))
    assert time.perf_counter() - start < 10
    browser.find_element("css selector", '[data-go="last"]').click()
    assert visible_ranks(browser) == list(range(3000 - 50 + 1, 3001))


def test_a_row_off_contract_is_reported_not_fatal(tmp_path):
    run = make_run(tmp_path / "outputs" / "score" / "broken")
    table = top_sequences()
    bad = table.index[table["model"] == "small"][0]
    table.at[bad, "tokens"] = ["only one piece"]  # 1 token, 4 token scores
    table.to_parquet(run / "top_sequences.parquet", index=False)
    report = build_report([run], tmp_path / "site", page_size=2)
    (line,) = report.runs[0].messages
    assert line.startswith("small: query pages stopped") and "1 tokens but 4 token_scores" in line
    assert len([p for p in report.pages if p.model == "tiny"]) == 2  # the other model's pages are built
    assert line in (report.out_dir / "runs" / "broken" / "index.html").read_text().replace("&#39;", "'")


def test_missing_zoo_studies_are_named_with_their_command(tmp_path):
    (tmp_path / "figures" / "sparsity").mkdir(parents=True)
    (tmp_path / "figures" / "sparsity" / "study.json").write_text("{}")
    lines = report_module.missing_studies(tmp_path)
    assert len(lines) == len(report_module.STUDIES) - 1 and not any("figures/sparsity/" in line for line in lines)
    assert "figures/roleplay/study.json does not exist yet: `make roleplay` (after `make zoo`)" in lines
