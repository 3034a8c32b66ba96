"""Session fixtures for the zoo tests: one micro zoo per test session, shared by every test file.

Import them in a test module: ``from zoo_fixtures import micro_zoo  # noqa: F401``.
build_micro_zoo is idempotent, so every module that imports the fixture reuses the same folder.
"""

from pathlib import Path

import pytest

from experiments.zoo import MicroZoo, build_micro_zoo


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> MicroZoo:
    return build_micro_zoo(tmp_path_factory.getbasetemp() / "micro_zoo")


@pytest.fixture(scope="session")
def study_artifacts(tmp_path_factory) -> Path:
    """The micro studies' score cache, shared by every test file, so the micro model is scored once per session."""
    return tmp_path_factory.mktemp("study_artifacts")


@pytest.fixture(scope="session")
def plain(tmp_path_factory) -> dict:
    """The plain testbed at its micro size (experiments/plain.py): a text-only corpus of 80 licence chunks, plain
    queries, 20 program messages with their Korean and Turkish translations, and a GPT-2 and a Llama trained 30 steps.
    Keys: root, corpus, queries, translations, gpt2, llama (paths)."""
    from experiments.plain import PlainSettings, build_plain

    root = tmp_path_factory.getbasetemp() / "plain"
    paths = build_plain(root, PlainSettings(steps=30, max_sequences=80, chunk_words=50, messages=20))
    return {"root": root, "corpus": root / "corpus.jsonl", "queries": root / "queries.jsonl",
            "translations": root / "translations.jsonl", **paths}
