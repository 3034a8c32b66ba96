"""A browsable report: per study and query, the top influential training sequences with token-wise colouring.

    python -m experiments.report                                # make report: every study in figures/<study>/
    python -m experiments.report --results outputs/roleplay/final --top-k 0 --out outputs/report_all
    python -m http.server -d outputs/report 8000                # view it (or open outputs/report/index.html)

saved results of a study (figures/<study>/ or a run folder: README.md with the resolved config, tables, figures)
  -> its config -> per model, the study's own cached scores (experiments.study.scored_models with
     INFLUENCE_LAB_FIGURES_ONLY set, as `make figures`: saved scores are read, nothing is computed)
  -> SequenceRow dataclasses -> Jinja2 templates (autoescaped) -> a static site:
     index.html, <study>/index.html (figures, tables, verdicts, resolved config, query links),
     queries/<model>/<group>/<query>.html (prompt, completion, top sequences, token colouring, per-layer bars).

Studies share one score cache per model, so each query page is built once and linked from every study using it.
Rows are paginated in the browser: page 1 is in the document, later pages wait in inert <template> elements.
Red marks positive influence (the sequence raises log p(completion)), blue negative, opacity |score| / max |score|
within the sequence (tokens) or row (layers).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jinja2
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.common import InfluenceRun, config_digest
from experiments.study import REPO, numerical_settings, scored_models, study_queries
from experiments.zoo.queries import Query as WorldQuery
from influence_core import InfluenceScores

STUDIES = ("sparsity", "layerwise", "word_order", "scale", "crosslingual", "math_code", "roleplay")
METADATA = ("doc_id", "family", "topic", "language", "word_order", "fact_ids")
TEMPLATES = Path(__file__).resolve().parent / "report_templates"
COPIED_SUFFIXES = (".png", ".pdf", ".csv", ".md")  # figures and tables; raw parquet scores stay in the run folder
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
# Without these, headless chromium waits on network services that a sandboxed machine refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


@dataclass
class Shade:
    """One coloured unit (a token piece or a layer): its influence, sign class and strength in [0, 1]."""

    label: str
    value: float
    sign: str  # "pos" (red), "neg" (blue) or "zero"
    strength: float  # |value| / max |value| over the sequence (tokens) or the row (layers)


@dataclass
class SequenceRow:
    """One training sequence on a query page."""

    rank: int  # 1 = most positively influential
    train_index: int
    influence: float  # total influence, exactly as saved
    metadata: dict[str, str]
    layers: list[Shade]  # per-layer split of `influence`, in the order of the saved layer names
    text: str
    tokens: list[Shade] = field(default_factory=list)  # token-wise influence; empty where it was not computed


@dataclass
class QueryPage:
    """A query's top sequences for one model's saved scores."""

    query: WorldQuery
    model: str
    scores_dir: Path  # artifacts/scores/<model>/ (the key below it is the studies' business)
    layer_names: list[str]
    num_train: int
    rows: list[SequenceRow]
    layer_totals: list[Shade]  # per-layer influence summed over the rows
    notice: str = ""  # why tokens are not coloured, when they are not
    path: str = ""  # relative to the site root


@dataclass
class Study:
    """A study's saved results: what it is, how it was made, and the models whose saved scores were found."""

    name: str
    results_dir: Path
    description: str
    command: str
    config: DictConfig
    queries: list[WorldQuery]
    models: list[str] = field(default_factory=list)  # models with saved scores, in the config's order
    groups: dict[str, str] = field(default_factory=dict)  # model -> score group (see score_group)
    messages: list[str] = field(default_factory=list)  # models without saved scores, and why


@dataclass
class Report:
    """What build_report wrote: the site folder, the studies in it, the query pages and what was skipped."""

    out_dir: Path
    studies: list[Study]
    pages: list[QueryPage]  # with the rows of their first browser page only, to keep memory flat
    skipped: list[str]

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


def shade(label: str, value: float, scale: float) -> Shade:
    """Sign and strength of one influence value: red for positive, blue for negative (paper's token figures)."""
    sign = "pos" if value > 0 else "neg" if value < 0 else "zero"
    return Shade(label, float(value), sign, min(1.0, abs(value) / scale) if scale > 0 else 0.0)


def shades(labels: Sequence[str], values: Sequence[float]) -> list[Shade]:
    """Shades of several values on a shared scale (their largest magnitude)."""
    scale = max((abs(float(v)) for v in values), default=0.0)
    return [shade(label, float(v), scale) for label, v in zip(labels, values)]


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names without their common prefix up to a dot: gpt_neox.layers.3.mlp.x -> 3.mlp.x."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    cut = prefix.rfind(".") + 1
    return [n[cut:] for n in names]


# ---- reading saved results ---------------------------------------------------------------------------------------

def read_readme(results_dir: Path) -> tuple[str, str, str, str | None]:
    """(study name, description, command, resolved config yaml) from the README.md that StudyOutput writes."""
    path = Path(results_dir) / "README.md"
    if not path.exists():
        raise FileNotFoundError(f"no saved results in {results_dir} (no README.md); run the study first "
                                "(e.g. `make roleplay`)")
    text = path.read_text()
    title = re.search(r"^# (\S+)", text, re.M)
    if title is None:
        raise ValueError(f"{path} has no '# <study>' title line; it was not written by a study")
    paragraphs = [p.strip() for p in text[title.end():].split("\n\n") if p.strip()]
    command = re.search(r"```bash\n(.*?)\n```", text, re.S)
    config = re.search(r"Resolved config:\s*```yaml\n(.*?)\n```", text, re.S)
    return (title.group(1), paragraphs[0] if paragraphs else "", command.group(1) if command else "",
            config.group(1) if config else None)


def load_study(results_dir: Path) -> Study:
    """A study's README, resolved config and queries (the config is the Hydra run's .hydra/config.yaml when there
    is one, else the README's resolved config)."""
    results_dir = Path(results_dir)
    name, description, command, config_yaml = read_readme(results_dir)
    hydra_config = results_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():
        config = OmegaConf.load(hydra_config)
    elif config_yaml is not None:
        config = OmegaConf.create(config_yaml)
    else:
        raise ValueError(f"{results_dir}/README.md has no resolved config and there is no .hydra/config.yaml")
    return Study(name, results_dir, description, command, config, study_queries(config))


def score_group(config: DictConfig, model: str) -> str:
    """What one model's scores depend on in a study config (model path, data, queries, influence settings,
    top_k_tokens), hashed: studies in one group read the same saved scores, so their query pages are shared."""
    return config_digest(OmegaConf.create({
        "model": model, "model_path": config.get("model_paths", {}).get(model), "data": config.data,
        "queries": [q.name for q in study_queries(config)], "influence": numerical_settings(config.influence),
        "top_k_tokens": int(config.get("top_k_tokens", 0))}))


@contextmanager
def figures_only() -> Iterator[None]:
    """Studies read saved scores and refuse to compute, as in `make figures`."""
    before = os.environ.get("INFLUENCE_LAB_FIGURES_ONLY")
    os.environ["INFLUENCE_LAB_FIGURES_ONLY"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["INFLUENCE_LAB_FIGURES_ONLY"]
        else:
            os.environ["INFLUENCE_LAB_FIGURES_ONLY"] = before


def saved_scores(config: DictConfig, model: str):
    """(StudyInputs, InfluenceRun) of one model from the study's own score cache; FileNotFoundError when the
    scores were not saved for this model, data and weights (or the model or data are not on disk)."""
    with figures_only():
        return next(scored_models(OmegaConf.merge(config, {"models": [model]})))


# ---- query pages -------------------------------------------------------------------------------------------------

def metadata_text(value) -> str:
    """Metadata cell -> short text (lists such as fact_ids are joined)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "__len__"):
        return ", ".join(str(v) for v in value)
    return str(value)


def token_spans(ids: list[int], tokenizer) -> list[tuple[str, int, int]]:
    """A sequence's decoded pieces with their token spans [start, end). Byte-level tokens that split a character
    (decoding alone to U+FFFD) are merged with the next ones, as experiments.demo.token_pieces does; one batched
    decode covers the common case of whole-character tokens."""
    singles = tokenizer.batch_decode([[i] for i in ids])
    spans, start = [], 0
    for end in range(1, len(ids) + 1):
        text = singles[start] if end - start == 1 else tokenizer.decode(ids[start:end])
        if not text.endswith("\ufffd"):
            spans.append((text, start, end))
            start = end
    if start < len(ids):
        spans.append((tokenizer.decode(ids[start:]), start, len(ids)))
    return spans


def sequence_rows(scores: InfluenceScores, query: int, texts: Sequence[str], metadata: Sequence[dict[str, str]],
                  spans: Callable[[int], list[tuple[str, int, int]]], top_k: int | None) -> list[SequenceRow]:
    """The top_k most influential training sequences of one query (all when top_k is None), with their
    per-layer split and, where token-wise influence was saved, the sequence split into its scored tokens.

    spans(n): sequence n's decoded pieces and their token spans (token_spans of the ids that were scored); a
    piece's influence is the sum over its tokens, so the pieces of a sequence sum to its total influence.
    """
    labels = short_layer_names(scores.layer_names)
    rows = []
    k = scores.total.shape[1] if top_k is None else top_k
    for rank, (n, value) in enumerate(scores.top(query, k), start=1):
        tokens: list[Shade] = []
        if scores.per_token is not None and bool(scores.per_token[query, n].any()):
            values = scores.per_token[query, n].tolist()
            pieces = spans(n)
            tokens = shades([text for text, _, _ in pieces], [sum(values[a:b]) for _, a, b in pieces])
        rows.append(SequenceRow(rank, n, value, metadata[n], shades(labels, scores.per_layer[query, n].tolist()),
                                texts[n], tokens))
    return rows


def query_pages(inputs, run: InfluenceRun, artifacts: Path, group: str, top_k: int | None) -> Iterator[QueryPage]:
    """One QueryPage per query of a model's saved scores (inputs: the study's StudyInputs for that model)."""
    by_name = {q.name: q for q in inputs.queries}
    notice = "" if run.scores.per_token is not None else \
        "tokens are not coloured: these scores were saved without token-wise influence (top_k_tokens=0)"
    columns = [c for c in METADATA if c in inputs.train_metadata.columns]
    metadata = [{c: metadata_text(v) for c, v in record.items()}
                for record in inputs.train_metadata[columns].to_dict("records")]

    @functools.cache
    def spans(n: int) -> list[tuple[str, int, int]]:  # the same for every query: decode each sequence once
        length = int(run.train_attention_mask[n].sum())
        return token_spans(run.train_input_ids[n, :length].tolist(), inputs.tokenizer)

    for q_index, name in enumerate(run.scores.query_names):
        rows = sequence_rows(run.scores, q_index, inputs.train_texts, metadata, spans, top_k)
        totals = [sum(row.layers[j].value for row in rows) for j in range(len(run.scores.layer_names))]
        yield QueryPage(by_name[name], inputs.model_name, Path(artifacts) / "scores" / inputs.model_name,
                        list(run.scores.layer_names), len(inputs.train_texts), rows,
                        shades(run.scores.layer_names, totals), notice,
                        f"queries/{inputs.model_name}/{group}/{safe_name(name)}.html")


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


# ---- rendering ---------------------------------------------------------------------------------------------------

def template_environment() -> jinja2.Environment:
    """Jinja2 with autoescaping on for every template: all text from the data is escaped."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, fmt=".4g": format(v, fmt) if isinstance(v, float) else v
    return env


def relative_root(path: str) -> str:
    """'../' for each folder between a page and the site root."""
    return "../" * path.count("/")


def write_page(env: jinja2.Environment, out_dir: Path, path: str, template: str, **context) -> None:
    target = Path(out_dir) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(env.get_template(template).render(root=relative_root(path), **context))


def render_query_page(env: jinja2.Environment, page: QueryPage, page_size: int, studies: Sequence[Study],
                      settings: dict, context: dict) -> str:
    """A query page as HTML: rows in pages of page_size, the first live, the rest in <template>s.
    settings: what produced the scores (influence config, timings), shown as JSON."""
    chunks = [page.rows[i: i + page_size] for i in range(0, len(page.rows), page_size)] or [[]]
    return env.get_template("query.html").render(
        root=relative_root(page.path), page=page, chunks=chunks, studies=studies, settings=settings,
        token_rows=sum(bool(r.tokens) for r in page.rows), **context)


def study_files(results_dir: Path) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(figures, tables) of a results folder: [(png, its pdf)], [(csv, its markdown)], None where missing."""
    files = {p.name for p in Path(results_dir).iterdir() if p.is_file()}

    def pairs(suffix: str, other: str) -> list[tuple[str, str | None]]:
        return [(f, f"{f[:-len(suffix)]}{other}" if f"{f[:-len(suffix)]}{other}" in files else None)
                for f in sorted(files) if f.endswith(suffix)]

    return pairs(".png", ".pdf"), pairs(".csv", ".md")


def copy_study_files(results_dir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in Path(results_dir).iterdir():
        if path.is_file() and path.suffix in COPIED_SUFFIXES and path.name != "README.md":
            shutil.copy2(path, target / path.name)


def verdict_rows(results_dir: Path) -> list[dict]:
    path = Path(results_dir) / "verdicts.csv"
    return pd.read_csv(path).to_dict("records") if path.exists() else []


def config_yaml(config: DictConfig) -> str:
    """The config with interpolations resolved where they can be (e.g. ${oc.env:...}), else as saved."""
    try:
        return OmegaConf.to_yaml(config, resolve=True)
    except Exception:  # noqa: BLE001 - a resolver of another app (e.g. hydra's ${now:}) is not registered here
        return OmegaConf.to_yaml(config)


def build_report(results_dirs: Sequence[Path], out_dir: Path = Path("outputs/report"), top_k: int | None = 200,
                 page_size: int = 50, command: str = "python -m experiments.report") -> Report:
    """Build the static site from saved study results; studies without saved scores are skipped with a message.

    results_dirs: study result folders (figures/<study>/ or outputs/<study>/<run>/).
    top_k: sequences per query page (None: every training sequence); page_size: rows per browser page.
    """
    if page_size < 1:
        raise ValueError(f"page_size={page_size}; give at least 1 row per page")
    out_dir = Path(out_dir)
    env = template_environment()
    context = {"built": datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command}
    studies, skipped = [], []
    for results_dir in results_dirs:
        try:
            studies.append(load_study(Path(results_dir)))
        except (FileNotFoundError, KeyError, ValueError) as error:
            skipped.append(f"{results_dir}: {error}")
            print(f"report: skip {results_dir}: {error}", file=sys.stderr)
    # (study, model) pairs grouped by the scores they read: each group is loaded and rendered once.
    groups: dict[str, list[tuple[Study, str]]] = {}
    for study in studies:
        for model in study.config.models:
            study.groups[model] = score_group(study.config, model)
            groups.setdefault(study.groups[model], []).append((study, model))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(TEMPLATES / "static", out_dir / "static")

    pages: list[QueryPage] = []
    links: dict[tuple[str, str], str] = {}  # (group, query) -> page path
    for group, users in groups.items():
        study, model = users[0]
        try:
            inputs, run = saved_scores(study.config, model)
        except (FileNotFoundError, OSError, KeyError, ValueError) as error:
            for user, _ in users:
                user.messages.append(f"{model}: {error}")
            print(f"report: {model} ({', '.join(u.name for u, _ in users)}): no saved scores: {error}", file=sys.stderr)
            continue
        for user, _ in users:
            user.models.append(model)
        settings = {"model": model, "influence": OmegaConf.to_container(study.config.influence, resolve=True),
                    "top_k_tokens": study.config.get("top_k_tokens", 0), "timings_s": run.timings_s}
        start = time.perf_counter()
        for page in query_pages(inputs, run, Path(study.config.artifacts), group, top_k):
            target = out_dir / page.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render_query_page(env, page, page_size, [u for u, _ in users], settings, context))
            links[(group, page.query.name)] = page.path
            page.rows = page.rows[:page_size]  # keep the first page only: the pages of every model fit in memory
            pages.append(page)
        print(f"report: {model}: {len(run.scores.query_names)} query pages in {time.perf_counter() - start:.1f}s "
              f"({', '.join(u.name for u, _ in users)})", file=sys.stderr)
        del inputs, run

    for study in studies:
        if not study.models:
            skipped.append(f"{study.results_dir}: no saved scores for any model of {study.name} "
                           f"({'; '.join(study.messages)})")
            continue
        study.models.sort(key=list(study.config.models).index)
        copy_study_files(study.results_dir, out_dir / study.name / "files")
        figures, tables = study_files(study.results_dir)
        query_links = [(q, [(m, links.get((study.groups[m], q.name))) for m in study.models]) for q in study.queries]
        write_page(env, out_dir, f"{study.name}/index.html", "study.html", study=study, figures=figures,
                   tables=tables, verdicts=verdict_rows(study.results_dir), query_links=query_links,
                   config=config_yaml(study.config), **context)
    studies = [s for s in studies if s.models]
    write_page(env, out_dir, "index.html", "index.html", studies=studies, skipped=skipped, **context)
    return Report(out_dir, studies, pages, skipped)


# ---- headless browser --------------------------------------------------------------------------------------------

def browser_missing() -> str | None:
    """Why the headless browser cannot run here, or None when it can."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (f"no headless browser: {CHROMIUM} or {CHROMEDRIVER} is missing; "
                "install Debian's with `apt-get install -y chromium chromium-driver`")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed; `pip install -e .[dev]`"
    return None


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1400):
    """Selenium driving Debian's chromium headless, with a fresh profile and no background network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1400) -> Path:
    """A screenshot of a built page (its first screen) in headless chromium."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with headless_chromium(width, height) as driver:
        driver.get(Path(page).resolve().as_uri())
        driver.save_screenshot(str(png))
    return png


def screenshot_page(report: Report, query: str) -> QueryPage | None:
    """The page of `query` on the largest model that has it (study configs list models smallest first), else the
    first page built."""
    sizes = max((list(s.config.models) for s in report.studies), key=len, default=[])
    matches = sorted((p for p in report.pages if p.query.name == query),
                     key=lambda p: sizes.index(p.model) if p.model in sizes else -1)
    return matches[-1] if matches else (report.pages[0] if report.pages else None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the static HTML report from saved study results.")
    parser.add_argument("--results", nargs="+", type=Path, default=[REPO / "figures" / s for s in STUDIES],
                        help="study result folders (default: figures/<study> for every study)")
    parser.add_argument("--out", type=Path, default=Path("outputs/report"), help="site folder (replaced)")
    parser.add_argument("--top-k", type=int, default=200, help="sequences per query page; 0: every sequence")
    parser.add_argument("--page-size", type=int, default=50, help="sequences per browser page")
    parser.add_argument("--screenshot", default=str(REPO / "figures" / "report" / "query_page.png"),
                        help="where to save a screenshot of one query page (needs chromium); '' to skip")
    parser.add_argument("--screenshot-query", default="shutdown", help="the query whose page is photographed")
    args = parser.parse_args(argv)
    command = " ".join(["python -m experiments.report", *(argv if argv is not None else sys.argv[1:])]).strip()
    report = build_report(args.results, args.out, args.top_k or None, args.page_size, command)
    print(f"report: {len(report.studies)} studies, {len(report.pages)} query pages -> {report.index}")
    for line in report.skipped:
        print(f"  skipped {line}")
    if not args.screenshot or not report.pages:
        return
    missing = browser_missing()
    if missing:
        print(f"report: no screenshot ({missing})")
        return
    page = screenshot_page(report, args.screenshot_query)
    png = screenshot(report.out_dir / page.path, args.screenshot)
    (png.parent / "README.md").write_text(
        f"# report\n\n`{png.name}`: the page of query `{page.query.name}` on `{page.model}` ({page.path} in the "
        f"site), in headless chromium at 1280x1400.\n\nRegenerate with (`make report` runs the first line with "
        f"its defaults):\n\n```bash\n{command}\npython -m http.server -d {args.out} 8000   # to browse the site\n"
        f"```\n")
    print(f"report: screenshot of {page.path} -> {png}")


if __name__ == "__main__":
    main()
