"""Translators of training sequences, for the cross-lingual study (paper Sec 5.3.1, Figs 15-16).

A Translator turns English texts into another language. Nothing here makes a translation up: a text is
translated by a given file or by a translation model, or the study refuses.

    translatable(texts, language) -> [bool]   False: the source lists the text as having no translation
    translate(texts, language) -> [str]       the translations, in order (only texts that are translatable)

(a) FileTranslator: given translations, a .jsonl (one object per line) or .json (a list) of
    {"text": <English source>, "ko": <Korean>, "tr": <Turkish>}, looked up by the exact source text. A language
    that is null (optionally with an "untranslatable" reason) marks the text as having no translation; a text
    absent from the file is an error naming it and the file. Config: translation.file=FILE.
(b) PipelineTranslator: a transformers translation model per language, loaded from a local folder with
    transformers.pipeline("translation", model=FOLDER, **options). Config: translation.models.ko=FOLDER,
    translation.models.tr=FOLDER, and translation.options.<language> (e.g. NLLB's src_lang / tgt_lang).
(c) translator_from_config: (a) or (b) from the config; with neither, a NoTranslator error naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

from omegaconf import DictConfig, OmegaConf

from experiments.records import read_records

HOW_TO_CONFIGURE = ("give translation.file=FILE (a .jsonl/.json of {\"text\": <English source>, \"ko\": ..., "
                    "\"tr\": ...}; for the zoo: python -m experiments.zoo.translations DATASET writes one) or "
                    "translation.models.ko=FOLDER translation.models.tr=FOLDER (local transformers translation "
                    "models)")


class NoTranslator(ValueError):
    """Neither a translations file nor translation models are configured."""


class MissingTranslation(ValueError):
    """A text that the translations file does not list."""


@runtime_checkable
class Translator(Protocol):
    description: str

    def translatable(self, texts: Sequence[str], language: str) -> list[bool]: ...

    def translate(self, texts: Sequence[str], language: str) -> list[str]: ...


def _excerpt(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width] + "...")


class FileTranslator:
    """Given translations from a .jsonl / .json file, looked up by the exact English source text."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"translation.file={self.path} does not exist; {HOW_TO_CONFIGURE}")
        rows = self._read_rows()
        self.rows: dict[str, dict] = {}
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise ValueError(f"{self.path}: row {number} lacks a non-empty \"text\" (the English source)")
            previous = self.rows.get(row["text"])
            if previous is not None and previous != row:
                raise ValueError(f"{self.path}: row {number} repeats the source {_excerpt(row['text'])} with "
                                 "other translations; keep one row per source text")
            self.rows[row["text"]] = row
        notes = sorted({row["note"] for row in self.rows.values() if row.get("note")})
        self.description = f"given translations from {self.path}" + (f" ({'; '.join(notes[:3])})" if notes else "")

    def _read_rows(self) -> list:
        if self.path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"translation.file={self.path}: give a .jsonl or .json file")
        rows = read_records(self.path)
        if not isinstance(rows, list):
            raise ValueError(f"{self.path}: a .json translations file holds a list of rows")
        return rows

    def _row(self, text: str) -> dict:
        row = self.rows.get(text)
        if row is None:
            raise MissingTranslation(f"no translation of {_excerpt(text)} in {self.path}; add a row "
                           "{\"text\": <that text>, \"ko\": ..., \"tr\": ...} (null marks it untranslatable)")
        return row

    def translatable(self, texts: Sequence[str], language: str) -> list[bool]:
        return [self._row(text).get(language) not in (None, "") for text in texts]

    def translate(self, texts: Sequence[str], language: str) -> list[str]:
        out = []
        for text in texts:
            row = self._row(text)
            value = row.get(language)
            if value in (None, ""):
                reason = row.get("untranslatable") or f"no \"{language}\" value"
                raise ValueError(f"{self.path} has no {language} translation of {_excerpt(text)} ({reason})")
            out.append(value)
        return out


class PipelineTranslator:
    """A transformers translation model per language from local folders (loaded on first use)."""

    def __init__(self, folders: Mapping[str, str], options: Mapping[str, Mapping] | None = None, batch_size: int = 8):
        self.folders = {language: Path(folder) for language, folder in folders.items() if folder}
        for language, folder in self.folders.items():
            if not folder.is_dir():
                raise FileNotFoundError(f"translation.models.{language}={folder} is not a folder; give a local "
                                        "folder saved with save_pretrained (a transformers translation model)")
        self.options = {language: dict(options.get(language) or {}) for language in self.folders} if options else {}
        self.batch_size = batch_size
        self.pipelines: dict = {}
        self.description = "transformers translation models: " + ", ".join(
            f"{language} from {folder}" for language, folder in self.folders.items())

    def _pipeline(self, language: str):
        if language not in self.folders:
            raise ValueError(f"no translation model for '{language}'; give translation.models.{language}=FOLDER")
        if language not in self.pipelines:
            import transformers

            self.pipelines[language] = transformers.pipeline("translation", model=str(self.folders[language]),
                                                             **self.options.get(language, {}))
        return self.pipelines[language]

    def translatable(self, texts: Sequence[str], language: str) -> list[bool]:
        if language not in self.folders:
            raise ValueError(f"no translation model for '{language}'; give translation.models.{language}=FOLDER")
        return [True] * len(texts)

    def translate(self, texts: Sequence[str], language: str) -> list[str]:
        if not texts:
            return []
        results = self._pipeline(language)(list(texts), batch_size=self.batch_size)
        return [r["translation_text"] if isinstance(r, dict) else r[0]["translation_text"] for r in results]


def translator_from_config(translation: DictConfig | Mapping | None, languages: Sequence[str]) -> Translator:
    """The configured translator for `languages`: translation.file, or translation.models.<language> for every
    language; neither (or both) is refused before anything is computed."""
    translation = OmegaConf.create(translation or {}) if not isinstance(translation, DictConfig) else translation
    file = translation.get("file")
    models = {k: v for k, v in (translation.get("models") or {}).items() if v}
    if file and models:
        raise ValueError(f"both translation.file={file} and translation.models {sorted(models)} are set; give one")
    if file:
        return FileTranslator(file)
    if models:
        missing = [language for language in languages if language not in models]
        if missing:
            raise ValueError(f"no translation model for {missing}; give translation.models.{missing[0]}=FOLDER")
        options = OmegaConf.to_container(translation.get("options") or {}, resolve=True) if isinstance(
            translation.get("options"), DictConfig) else (translation.get("options") or {})
        return PipelineTranslator(models, options, int(translation.get("batch_size") or 8))
    raise NoTranslator(f"the crosslingual study needs translations of the top sequences and none is configured: "
                       f"{HOW_TO_CONFIGURE}")
