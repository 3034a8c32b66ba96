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
