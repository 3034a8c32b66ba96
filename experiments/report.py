"""A browsable report of any run: per query and model, the top influential training sequences, tokens coloured.

    influence-lab report outputs/score/<name>            # one run (a `score` run or a study's result folder)
    python -m experiments.report RUN_DIR [RUN_DIR ...] --out outputs/report --top-k 200 --page-size 50
    make report                                          # every figures/**/study.json and outputs/**/study.json
    python -m http.server -d outputs/report 8000         # view it (or open outputs/report/index.html)

The report reads only the result contract (experiments.results): a run folder's study.json and the files it names.
It loads no model and computes no score; nothing parses README.md.

    study.json -> tables["queries"] (csv: name, prompt, completion, extra columns)
               -> tables["top_sequences"] (parquet: one row per model, query, rank; text, tokens, token_scores,
                  layer:<module> columns, single_token_dominance, spurious, corpus metadata columns)
               -> SequenceRow / QueryPage / Run dataclasses -> Jinja2 templates (autoescaped) -> a static site:
      index.html                               every run: study, models, corpus, queries, verdict table
      runs/<run>/index.html                    figures, tables, verdicts, settings (yaml), command, paper figures
      runs/<run>/queries/<model>/<query>.html  prompt, completion, top sequences, token colouring, per-layer bars

Rows are paginated in the browser: page 1 is in the document, later pages wait in inert <template> elements.
Red marks positive influence (the sequence raises log p(completion)), blue negative, opacity |score| / max |score|
within the sequence (tokens) or row (layers). A sequence whose token-wise influence is dominated by one token
(single_token_dominance = ||a||_2 / ||a||_1 > 2/3, flagged `spurious` by the pipeline) is marked, and listed apart:
the paper's figures show only sequences below that threshold.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
import pandas as pd
import yaml

from experiments.results import STUDY_FILE, VERDICT_KEYS, ResultContractError, StudyRecord, read_study, read_rows

STUDIES = ("sparsity", "layerwise", "word_order", "scale", "crosslingual", "math_code", "roleplay", "memorisation")
SCORE_COMMAND = "influence-lab score --model PATH --data PATH --queries PATH"
MAKE_RESULTS = (f"`make sparsity` (or layerwise, word_order, scale, crosslingual, math_code, roleplay) "
                f"or `{SCORE_COMMAND}`")
SEARCHED = ("figures", "outputs")  # where `make report` looks for study.json files
# Columns of the top_sequences table that are not corpus metadata.
CONTRACT_COLUMNS = ("model", "query", "rank", "train_id", "influence", "text", "tokens", "token_scores",
                    "single_token_dominance", "spurious")
LAYER_PREFIX = "layer:"
SPURIOUS_THRESHOLD = 2 / 3
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
TABLE_SUFFIXES = (".csv", ".md")  # tables the site copies and shows; parquet stays in the run folder
INLINE_TABLE_ROWS = 30  # csv tables up to this many rows are shown on the run page, longer ones linked
TEMPLATES = Path(__file__).resolve().parent / "report_templates"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
# Without these, headless chromium waits on network services that a sandboxed machine refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


class NoResultsError(FileNotFoundError):
    """Nothing to report: no run folder with a study.json. The message names the commands that make one."""


@dataclass
class Shade:
    """One coloured unit (a token piece or a layer): its influence, sign class and strength in [0, 1]."""

    label: str
    value: float
    sign: str  # "pos" (red), "neg" (blue) or "zero"
    strength: float  # |value| / max |value| over the sequence (tokens) or the row (layers)


@dataclass
class SequenceRow:
    """One training sequence on a query page (one row of top_sequences)."""

    rank: int  # 1 = most positively influential
    train_id: int
    influence: float  # total influence, exactly as saved
    text: str  # the full sequence text
    layers: list[Shade]  # per-layer split of `influence`, in the order of the table's layer columns
    tokens: list[Shade] = field(default_factory=list)  # token-wise influence; empty where it was not computed
    rest: str = ""  # text after the scored tokens (a sequence truncated for scoring), shown unshaded
    metadata: dict[str, str] = field(default_factory=dict)  # corpus metadata columns present in the table
    dominance: float | None = None  # single_token_dominance, where token-wise influence was computed
    spurious: bool | None = None  # dominance > 2/3 (the paper's rule); None where not computed


@dataclass
class Query:
    """A row of the run's queries table."""

    name: str
    prompt: str
    completion: str
    extra: dict[str, str] = field(default_factory=dict)  # the table's optional columns


@dataclass
class QueryPage:
    """One query's top sequences for one model of one run."""

    run: str  # the run's slug
    model: str
    query: Query
    rows: list[SequenceRow]  # after build_report: the rows of the first browser page only
    layer_names: list[str]  # full module paths of the layer:<name> columns
    layer_totals: list[Shade]  # per-layer influence summed over the rows
    num_rows: int = 0  # rows on the page, over every browser page
    token_rows: int = 0  # rows with token-wise influence
    spurious: list[SequenceRow] = field(default_factory=list)  # flagged rows, in rank order
    notice: str = ""  # why tokens are not coloured, or the query is not in the queries table
    path: str = ""  # relative to the site root


@dataclass
class Run:
    """A run folder read through its study.json: what the site shows of it."""

    slug: str  # its folder under runs/ in the site
    run_dir: Path
    record: StudyRecord
    queries: list[Query] = field(default_factory=list)  # the queries table, in its order
    models: list[str] = field(default_factory=list)  # models with rows in top_sequences, in study.json's order
    links: dict[tuple[str, str], QueryPage] = field(default_factory=dict)  # (model, query) -> its page
    messages: list[str] = field(default_factory=list)  # what could not be shown, and why

    @property
    def path(self) -> str:
        return f"runs/{self.slug}/index.html"

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.record.models]


@dataclass
class Report:
    """What build_report wrote: the site folder, the runs in it, the query pages and what was skipped."""

    out_dir: Path
    runs: list[Run]
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


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", str(name))


# ---- reading a run folder ----------------------------------------------------------------------------------------

def missing(value) -> bool:
    """None, NaN or pandas' NA (a null cell of the parquet table)."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def cell_list(value) -> list | None:
    """A list cell of the parquet table (numpy array, list) as a list; None for a null cell."""
    if value is None or (not hasattr(value, "__len__") and missing(value)):
        return None
    return list(value)


def metadata_text(value) -> str:
    """Metadata cell -> short text (lists such as fact_ids are joined)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "__len__"):
        return ", ".join(str(v) for v in value)
    return str(value)


def make_command(run_dir: Path) -> str:
    """The command that writes a run folder's study.json, guessed from its name."""
    run_dir = Path(run_dir)
    if run_dir.name in STUDIES:
        return f"`make {run_dir.name}`"
    if "score" in run_dir.parts:
        return f"`{SCORE_COMMAND}`"
    return MAKE_RESULTS


def missing_studies(root: Path | str = ".") -> list[str]:
    """Each zoo study without figures/<study>/study.json, with the command that makes it."""
    root = Path(root)
    return [f"figures/{study}/{STUDY_FILE} does not exist yet: {make_command(Path('figures') / study)} "
            "(after `make zoo`)" for study in STUDIES if not (root / "figures" / study / STUDY_FILE).exists()]


def discover_runs(root: Path | str = ".", exclude: Path | None = None) -> list[Path]:
    """Run folders with a study.json under root/figures and root/outputs (the site folder `exclude` aside)."""
    root = Path(root)
    found = []
    for top in SEARCHED:
        for path in sorted((root / top).rglob(STUDY_FILE)) if (root / top).is_dir() else []:
            if exclude is not None and Path(exclude).resolve() in path.resolve().parents:
                continue
            found.append(path.parent)
    return found


def no_results_message(root: Path | str = ".") -> str:
    return (f"no results to report: no study.json under {Path(root) / 'figures'} or {Path(root) / 'outputs'}; "
            f"make them with {MAKE_RESULTS}, then `make report`")


def read_queries(run_dir: Path, record: StudyRecord) -> list[Query]:
    """The run's queries table (csv: name, prompt, completion, optional columns)."""
    name = record.tables.get("queries")
    if name is None:
        raise ResultContractError(f"{run_dir}/{STUDY_FILE} names no 'queries' table")
    frame = pd.read_csv(Path(run_dir) / name, keep_default_na=False, dtype=str)
    absent = [c for c in ("name", "prompt", "completion") if c not in frame.columns]
    if absent:
        raise ResultContractError(f"{run_dir}/{name} lacks columns {absent}")
    extra = [c for c in frame.columns if c not in ("name", "prompt", "completion")]
    return [Query(r["name"], r["prompt"], r["completion"], {c: r[c] for c in extra if r[c] != ""})
            for r in frame.to_dict("records")]


def top_sequences_path(run_dir: Path, record: StudyRecord) -> Path:
    name = record.tables.get("top_sequences")
    if name is None:
        raise ResultContractError(f"{run_dir}/{STUDY_FILE} names no 'top_sequences' table")
    return Path(run_dir) / name


def sequence_row(record: dict, layer_columns: Sequence[str], labels: Sequence[str],
                 metadata_columns: Sequence[str]) -> SequenceRow:
    """One row of the top_sequences table as shown: token pieces shaded on the sequence's own scale, layers on
    the row's."""
    text = str(record["text"])
    tokens: list[Shade] = []
    rest = ""
    scores = cell_list(record.get("token_scores"))
    if scores is not None:
        pieces = [str(t) for t in cell_list(record.get("tokens")) or []]
        if len(pieces) != len(scores):
            raise ResultContractError(f"sequence {record['train_id']} has {len(pieces)} tokens but "
                                      f"{len(scores)} token_scores")
        tokens = shades(pieces, [float(v) for v in scores])
        scored = "".join(pieces)
        rest = text[len(scored):] if text.startswith(scored) else ""
    layers = [(label, record[c]) for label, c in zip(labels, layer_columns) if not missing(record[c])]
    dominance = record.get("single_token_dominance")
    spurious = record.get("spurious")
    if "spurious" not in record and not missing(dominance):  # a table without the flag: the paper's rule
        spurious = float(dominance) > SPURIOUS_THRESHOLD
    return SequenceRow(
        rank=int(record["rank"]), train_id=int(record["train_id"]), influence=float(record["influence"]), text=text,
        layers=shades([label for label, _ in layers], [v for _, v in layers]), tokens=tokens, rest=rest,
        metadata={c: metadata_text(record[c]) for c in metadata_columns
                  if not missing(record[c]) and metadata_text(record[c]) != ""},
        dominance=None if missing(dominance) else float(dominance),
        spurious=None if missing(spurious) else bool(spurious))


def query_pages(run: Run, frame: pd.DataFrame, model: str, top_k: int | None) -> Iterator[QueryPage]:
    """One QueryPage per query of one model's rows in top_sequences, queries in the queries table's order (then
    any the table lacks); top_k rows per page by rank (None: all)."""
    layer_columns = [c for c in frame.columns if c.startswith(LAYER_PREFIX)]
    layer_names = [c[len(LAYER_PREFIX):] for c in layer_columns]
    labels = short_layer_names(layer_names)
    metadata_columns = [c for c in frame.columns if c not in CONTRACT_COLUMNS and c not in layer_columns]
    by_name = {q.name: q for q in run.queries}
    names = [q.name for q in run.queries if q.name in set(frame["query"])]
    names += sorted(set(frame["query"]) - set(names))
    for name in names:
        group = frame[frame["query"] == name].sort_values("rank", kind="stable")
        if top_k is not None:
            group = group.head(top_k)
        rows = [sequence_row(r, layer_columns, labels, metadata_columns) for r in group.to_dict("records")]
        totals = [float(group[c].sum()) for c in layer_columns]
        token_rows = sum(bool(r.tokens) for r in rows)
        notice = ""
        if name not in by_name:
            notice = f"query {name!r} is not in the run's queries table; its prompt and completion are unknown. "
        if rows and token_rows == 0:
            notice += "Tokens are not coloured: token-wise influence was not computed for these sequences."
        yield QueryPage(run.slug, model, by_name.get(name, Query(name, "", "")), rows, layer_names,
                        shades(labels, totals), len(rows), token_rows, [r for r in rows if r.spurious], notice,
                        f"runs/{run.slug}/queries/{safe_name(model)}/{safe_name(name)}.html")


def load_run(run_dir: Path, slug: str) -> Run:
    """A run folder's study.json and queries table (the top_sequences table is read model by model later)."""
    record = read_study(run_dir)
    return Run(slug, Path(run_dir), record, read_queries(run_dir, record))


def run_slugs(run_dirs: Sequence[Path]) -> list[str]:
    """Unique site folder names of the runs: the folder's name, numbered where names repeat."""
    slugs, seen = [], {}
    for run_dir in run_dirs:
        base = safe_name(Path(run_dir).resolve().name) or "run"
        seen[base] = seen.get(base, 0) + 1
        slugs.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return slugs


# ---- run pages ---------------------------------------------------------------------------------------------------

def site_file(name: str) -> str:
    """Where a file named in study.json lands under the run's files/ (no escaping the folder with '..')."""
    parts = [p for p in Path(name).parts if p not in ("..", "/", "")]
    return "/".join(parts) if parts else Path(name).name


def run_files(run: Run) -> tuple[list[dict], list[dict]]:
    """(figures, tables) of a run as shown: figures [{name, image, others}] (an image and its other formats,
    e.g. the pdf), tables [{name, file, markdown, html}] (csv/md only; html: a short csv inlined)."""
    record, figures, by_stem = run.record, [], {}
    for name, file in record.figures.items():
        stem = str(Path(site_file(file)).with_suffix(""))
        by_stem.setdefault(stem, {"name": name, "image": None, "others": []})
        entry = by_stem[stem]
        if Path(file).suffix.lower() in IMAGE_SUFFIXES and entry["image"] is None:
            entry.update(name=name, image=site_file(file))
        else:
            entry["others"].append(site_file(file))
    figures = list(by_stem.values())
    files = {site_file(f) for f in record.tables.values()}
    tables = []
    for name, file in record.tables.items():
        if Path(file).suffix.lower() not in TABLE_SUFFIXES:
            continue
        markdown = str(Path(site_file(file)).with_suffix(".md"))
        if file.endswith(".md") and str(Path(site_file(file)).with_suffix(".csv")) in files:
            continue  # shown with its csv
        html = None
        if file.endswith(".csv"):
            try:
                frame = pd.read_csv(run.run_dir / file)
            except (OSError, ValueError) as error:  # pandas' ParserError is a ValueError
                run.messages.append(f"table {name} ({file}) is not readable csv: {error}")
                frame = pd.DataFrame()
            if 0 < len(frame) <= INLINE_TABLE_ROWS:
                html = frame.to_html(index=False, escape=True, na_rep="", float_format=lambda v: format(v, ".4g"),
                                     border=0, classes="data")
        tables.append({"name": name, "file": site_file(file), "html": html,
                       "markdown": markdown if file.endswith(".csv") and markdown in files else None})
    return figures, tables


def copy_run_files(run: Run, target: Path) -> None:
    """The run's figures and csv/md tables into the site (the parquet top_sequences stays in the run folder)."""
    names = list(run.record.figures.values()) + [f for f in run.record.tables.values()
                                                  if Path(f).suffix.lower() in TABLE_SUFFIXES]
    for name in names:
        source = run.run_dir / name
        if source.is_file():
            (target / site_file(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / site_file(name))
        else:
            run.messages.append(f"{name} is named in {STUDY_FILE} but missing from {run.run_dir}")


def settings_yaml(settings: dict) -> str:
    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True, default_flow_style=False) if settings \
        else "{}\n"


# ---- rendering ---------------------------------------------------------------------------------------------------

def number(value, fmt: str = ".4g") -> str:
    """A number for a table cell: '-' for a missing one, ints as they are, floats with fmt."""
    if missing(value):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, fmt) if isinstance(value, float) else str(value)


def template_environment() -> jinja2.Environment:
    """Jinja2 with autoescaping on for every template: all text from the data is escaped."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = number
    return env


def relative_root(path: str) -> str:
    """'../' for each folder between a page and the site root."""
    return "../" * path.count("/")


def write_page(env: jinja2.Environment, out_dir: Path, path: str, template: str, **context) -> None:
    target = Path(out_dir) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(env.get_template(template).render(root=relative_root(path), **context))


def render_query_page(env: jinja2.Environment, page: QueryPage, page_size: int, run: Run | None,
                      context: dict) -> str:
    """A query page as HTML: rows in pages of page_size, the first live, the rest in <template>s."""
    chunks = [page.rows[i: i + page_size] for i in range(0, len(page.rows), page_size)] or [[]]
    return env.get_template("query.html").render(root=relative_root(page.path), page=page, chunks=chunks, run=run,
                                                 threshold=SPURIOUS_THRESHOLD, **context)


def build_report(run_dirs: Sequence[Path | str], out_dir: Path | str = Path("outputs/report"),
                 top_k: int | None = 200, page_size: int = 50,
                 command: str = "python -m experiments.report") -> Report:
    """Build the static site from run folders' study.json and the tables they name; computes nothing.

    run_dirs: run folders (figures/<study>/, outputs/score/<name>/, ...); a folder without a readable study.json
    is skipped with a one-line reason naming the command that makes it. NoResultsError when none is left.
    top_k: sequences per query page (None: every row saved); page_size: rows per browser page.
    """
    if page_size < 1:
        raise ValueError(f"page_size={page_size}; give at least 1 row per page")
    out_dir = Path(out_dir)
    env = template_environment()
    context = {"built": datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command}
    runs, skipped = [], []
    for run_dir, slug in zip(run_dirs, run_slugs([Path(d) for d in run_dirs])):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            reason = f"no such folder; {make_command(run_dir)} makes a run folder"
        elif not (run_dir / STUDY_FILE).exists():
            reason = f"no {STUDY_FILE} (not a finished run folder); {make_command(run_dir)} makes it"
        else:
            try:
                runs.append(load_run(run_dir, slug))
                continue
            except (ResultContractError, OSError, KeyError, TypeError, ValueError) as error:
                reason = f"{type(error).__name__}: {error}"
        skipped.append(f"{run_dir}: {reason}")
        print(f"report: skip {run_dir}: {reason}", file=sys.stderr)
    if not runs:
        what = f"none of the {len(skipped)} folders has a readable {STUDY_FILE}" if skipped else "no run folders"
        raise NoResultsError(f"no results to report ({what}); make them with {MAKE_RESULTS}")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(TEMPLATES / "static", out_dir / "static")
    pages: list[QueryPage] = []
    for run in runs:
        try:
            path = top_sequences_path(run.run_dir, run.record)
            present = read_rows(path, columns=["model"])["model"].unique().tolist()
        except (ResultContractError, OSError, KeyError, ValueError) as error:
            run.messages.append(f"no query pages: {error}; rerun `{run.record.command or make_command(run.run_dir)}`")
            present, path = [], None
        order = run.model_names + sorted(set(present) - set(run.model_names))
        for model in order:
            if model not in present:
                run.messages.append(f"{model}: no rows in the top_sequences table")
                continue
            run.models.append(model)
            frame = read_rows(path, model=model)  # one model at a time
            try:
                for page in query_pages(run, frame, model, top_k):
                    target = out_dir / page.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(render_query_page(env, page, page_size, run, context))
                    page.rows = page.rows[:page_size]  # keep the first page only: every model's pages fit in memory
                    run.links[(model, page.query.name)] = page
                    pages.append(page)
            except (ResultContractError, KeyError, TypeError, ValueError) as error:
                run.messages.append(f"{model}: query pages stopped at a row the contract does not allow "
                                    f"({type(error).__name__}: {error}); rerun `{run.record.command or make_command(run.run_dir)}`")
            del frame
        copy_run_files(run, out_dir / "runs" / run.slug / "files")
        figures, tables = run_files(run)
        extra_queries = [name for (_, name) in run.links if name not in {q.name for q in run.queries}]
        queries = run.queries + [Query(name, "", "") for name in dict.fromkeys(extra_queries)]
        write_page(env, out_dir, run.path, "study.html", run=run, queries=queries, figures=figures, tables=tables,
                   settings=settings_yaml(run.record.settings),
                   verdict_extra=sorted({k for row in run.record.verdicts for k in row} - set(VERDICT_KEYS)),
                   **context)
        print(f"report: {run.run_dir}: {run.record.study}, {len(run.models)} models, "
              f"{sum(p.run == run.slug for p in pages)} query pages", file=sys.stderr)
    write_page(env, out_dir, "index.html", "index.html", runs=runs, skipped=skipped, **context)
    return Report(out_dir, runs, pages, skipped)



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
    """The page of `query` on the largest model that has it (by non-embedding parameters in study.json), else
    the first page built."""
    sizes = {m.name: m.non_embedding_parameters for run in report.runs for m in run.record.models}
    matches = sorted((p for p in report.pages if p.query.name == query), key=lambda p: sizes.get(p.model, -1))
    return matches[-1] if matches else (report.pages[0] if report.pages else None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="influence-lab report",
        description="Build the static HTML report from run folders' study.json (computes nothing, loads no model).")
    parser.add_argument("run_dirs", nargs="*", type=Path,
                        help="run folders with a study.json (default: every figures/**/study.json and "
                             "outputs/**/study.json under the current folder)")
    parser.add_argument("--out", type=Path, default=Path("outputs/report"), help="site folder (replaced)")
    parser.add_argument("--top-k", type=int, default=200, help="sequences per query page; 0: every saved row")
    parser.add_argument("--page-size", type=int, default=50, help="sequences per browser page")
    parser.add_argument("--screenshot", default=str(Path("figures") / "report" / "query_page.png"),
                        help="where to save a screenshot of one query page (needs chromium); '' to skip")
    parser.add_argument("--screenshot-query", default="shutdown", help="the query whose page is photographed")
    args = parser.parse_args(argv)
    command = " ".join(["python -m experiments.report", *(argv if argv is not None else sys.argv[1:])]).strip()
    run_dirs = args.run_dirs or discover_runs(Path.cwd(), exclude=args.out)
    if not run_dirs:
        sys.exit(f"report: {no_results_message()}")
    try:
        report = build_report(run_dirs, args.out, args.top_k or None, args.page_size, command)
    except NoResultsError as error:
        sys.exit(f"report: {error}")
    for line in report.skipped:
        print(f"report: skipped {line}")
    if not args.run_dirs:
        for line in missing_studies(Path.cwd()):
            print(f"report: not in the site: {line}")
    if args.screenshot and report.pages:
        shoot(report, args, command)
    print(f"report: {len(report.runs)} runs, {len(report.pages)} query pages; the site is {report.index} "
          f"(open it, or `python -m http.server -d {args.out} 8000`)")


def shoot(report: Report, args: argparse.Namespace, command: str) -> None:
    """The screenshot of one query page, with a README saying how it was made."""
    missing_browser = browser_missing()
    if missing_browser:
        print(f"report: no screenshot ({missing_browser})")
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
