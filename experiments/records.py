"""Small structured files that people write by hand (query sets, translations, probe sets): .jsonl, .json, .yaml."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path):
    """The parsed content of a small .jsonl (a list: one record per non-blank line), .json or .yaml/.yml file
    (as written); a line or file that does not parse is named in a one-line error."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error})") from error
        return rows
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from error
    raise ValueError(f"{path}: give a .jsonl, .json or .yaml file, not {path.suffix!r}")
