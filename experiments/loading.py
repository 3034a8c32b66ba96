"""Load a causal language model, its tokenizer and a text dataset the Hugging Face way.

The same calls serve the zoo (``artifacts/zoo/zoo_m/model``) and real models (``EleutherAI/pythia-410m``,
``gpt2``). No network is assumed: a name that is neither a local folder nor in the local Hugging Face cache is
refused at once, before anything is tried on the hub; downloading is allowed only when asked for with
``HF_HUB_OFFLINE=0`` (then ``from_pretrained`` fetches as usual).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_DATASET_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _looks_like_path(name_or_path: str) -> bool:
    """Hub names are "gpt2" or "org/name"; anything else with slashes, or starting with . / ~, is a local path, and
    so is an "org/name" whose first part is a local folder (e.g. "artifacts/model" run where artifacts/ exists)."""
    name = name_or_path.rstrip("/")
    if name_or_path.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _in_hub_cache(name: str) -> bool:
    """Whether a hub name has a config in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not cached
        return False


def _resolve_dtype(dtype) -> torch.dtype | str:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype if dtype is not None else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype")
    return names[dtype]


def downloads_allowed() -> bool:
    """Only an explicit ``HF_HUB_OFFLINE=0`` lets from_pretrained go to the hub; unset means offline."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")


def _check_exists(name_or_path: str, what: str) -> None:
    """Refuse, in one line and without touching the network, a name that is not a local folder or file and not in
    the Hugging Face cache (unless downloads are allowed): a mistyped `zoo_sx/model` must not wait on the hub."""
    path = Path(name_or_path).expanduser()
    if path.exists() or _in_hub_cache(name_or_path):
        return
    if _looks_like_path(name_or_path) or not downloads_allowed():
        raise FileNotFoundError(
            f"{what} path {str(path)!r} does not exist (relative to {os.getcwd()}) and is not in the Hugging Face "
            f"cache (HF_HOME). For a zoo model run `make zoo` first (models land in artifacts/zoo/<size>/model); "
            f"for a hub model, put it in the cache or a folder made with save_pretrained, or allow downloading "
            f"with HF_HUB_OFFLINE=0."
        )


def load_model_and_tokenizer(name_or_path: str | Path, dtype="float32", device: str | torch.device = "cpu", eval_mode: bool = True):
    """``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer.from_pretrained`` for a local folder or hub name.

    dtype: the weights' dtype, in which forward and backward run (float32, bfloat16/bf16, float16/fp16, float64, or
    "auto": the checkpoint's own); the engine accumulates factors and scores in float32 whatever it is.
    device: cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK where CUDA is available, else cpu).
    Returns (model, tokenizer). The tokenizer gets a pad token (eos) if it has none, as GPT-2's lacks one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from influence_core.distributed import resolve_device

    name_or_path = str(name_or_path)
    device = resolve_device(device)  # refuses a bad or unavailable device before the weights are read
    _check_exists(name_or_path, "model")
    try:
        local = not downloads_allowed()
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_resolve_dtype(dtype), local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise OSError(
            f"could not load {name_or_path!r}: {error}\nNo network is available here (HF_HUB_OFFLINE={offline}): "
            f"the weights and tokenizer must already be on disk, either in the Hugging Face cache (HF_HOME) or in a "
            f"local folder made with save_pretrained; pass that folder's path."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if eval_mode:
        model.eval()
    return model, tokenizer


def load_text_dataset(path_or_name: str | Path, split: str = "train", text_column: str = "text"):
    """A ``datasets.Dataset`` with a non-empty text column.

    path_or_name: a folder written by ``save_to_disk`` (Dataset or DatasetDict), a .json/.jsonl/.parquet/.txt/.csv
    file or a folder of them, or a hub name (only from the local cache when offline).
    """
    import datasets

    path_or_name = str(path_or_name)
    path = Path(path_or_name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file() or (path.is_dir() and any(p.suffix in _DATASET_FILE_TYPES for p in path.iterdir())):
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _DATASET_FILE_TYPES)
        if all(p.stat().st_size < 1 << 16 and not p.read_bytes().strip() for p in files):  # blank files only
            raise ValueError(f"dataset {path_or_name!r} is empty ({', '.join(p.name for p in files)} hold no "
                             "records); give at least one sequence")
        kinds = {_DATASET_FILE_TYPES.get(p.suffix) for p in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"cannot load {path}: use one kind of file among {sorted(_DATASET_FILE_TYPES)}, found {[p.name for p in files]}")
        try:
            loaded = datasets.load_dataset(kinds.pop(), data_files={split: [str(p) for p in files]})
        except ValueError as error:
            if "corresponds to no data" in str(error):
                raise ValueError(f"dataset {path_or_name!r} split {split!r} is empty; give at least one sequence") from error
            raise
        except StopIteration as error:  # datasets' json builder on files without a record
            raise ValueError(f"dataset {path_or_name!r} split {split!r} is empty; give at least one sequence") from error
    elif _looks_like_path(path_or_name):
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist; build the world with `make zoo` or point to a saved dataset")
    else:
        loaded = datasets.load_dataset(path_or_name)  # hub name: needs the local cache when offline
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise KeyError(f"split {split!r} not in {path_or_name!r}; available splits: {sorted(loaded)}")
        loaded = loaded[split]
    if text_column not in loaded.column_names:
        raise KeyError(f"column {text_column!r} not in {path_or_name!r}; available columns: {loaded.column_names}; pass text_column=")
    if len(loaded) == 0:
        raise ValueError(f"dataset {path_or_name!r} split {split!r} is empty; give at least one sequence")
    return loaded


def tokenize_sequences(dataset, tokenizer, max_length: int, text_column: str = "text", truncation: bool = False) -> dict:
    """Token ids of every sequence, right-padded to the longest one.

    Returns {"input_ids": (n, T) long, "attention_mask": (n, T) long, "lengths": (n,) long}, T <= max_length.
    Raises ValueError naming the first sequence longer than max_length unless ``truncation=True``.
    """
    texts = list(dataset[text_column]) if not isinstance(dataset, (list, tuple)) else list(dataset)
    if not texts:
        raise ValueError("no sequences to tokenize; the dataset is empty")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [(i, len(ids)) for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long and not truncation:
        i, n = too_long[0]
        raise ValueError(
            f"sequence {i} has {n} tokens, more than max_length={max_length} ({len(too_long)} sequences are too long); "
            f"raise max_length up to the model's context, split the texts, or pass truncation=True"
        )
    encoded = [ids[:max_length] for ids in encoded]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"sequence {empty[0]} is empty after tokenization; remove empty texts")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "lengths": attention_mask.sum(1)}


def model_max_length(model) -> int:
    """The model's context length (max_position_embeddings, or n_positions for GPT-2)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot find the context length in {type(config).__name__}; pass max_length explicitly")
