"""A byte-level BPE tokenizer trained on the world's train split, saved the Hugging Face way.

Special tokens follow Pythia: ``<|endoftext|>`` (bos/eos/unk) and ``<|padding|>`` (pad), so code written
for ``EleutherAI/pythia-*`` tokenizers works unchanged. ``AutoTokenizer.from_pretrained(path)`` loads it.
"""

from __future__ import annotations

import json

from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


def train_tokenizer(texts, vocab_size: int = 4096, min_frequency: int = 2):
    """A ``PreTrainedTokenizerFast`` with byte-level BPE; no leading space is added to a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
    )


def build_tokenizer(dataset_path: Path, out_path: Path, vocab_size: int = 4096) -> Path:
    """Train on ``dataset_path``'s train split and ``save_pretrained`` to ``out_path``; cached by the data's digest and
    the vocabulary size (a rebuilt world retrains it)."""
    import datasets

    from experiments.zoo.world import dataset_digest

    out_path = Path(out_path)
    source = {"dataset_sha256": dataset_digest(dataset_path), "vocab_size": vocab_size}
    source_file = out_path / "trained_on.json"
    if (out_path / "tokenizer.json").exists() and source_file.exists() and json.loads(source_file.read_text()) == source:
        return out_path
    train = datasets.load_from_disk(str(dataset_path))["train"]
    tokenizer = train_tokenizer(train["text"], vocab_size=vocab_size)
    tokenizer.save_pretrained(str(out_path))
    source_file.write_text(json.dumps(source, indent=1))
    return out_path
