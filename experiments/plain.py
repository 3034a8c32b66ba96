"""A plain, non-zoo testbed: real English text that exists on the machine, and models built from a config.

    python -m experiments.plain --out artifacts/plain            # corpus, tokenizer, GPT-2 and Llama models

corpus.jsonl: the licence texts Debian ships (/usr/share/common-licenses), cut into chunks of about
`chunk_words` words, and `messages` English program messages from the gettext catalogues installed under
/usr/share/locale, each with only a `text` column (no metadata). translations.jsonl: those messages' Korean and
Turkish translations as the catalogues give them ({text, ko, tr}: human translations that exist on the machine,
for the cross-lingual study's file translator; the licence chunks are listed with null, untranslatable). queries.jsonl: plain {name, prompt, completion} queries whose
answers the licences state, and two cut from message strings of the corpus (prompt: all but the last three
words; completion: those words). Models: a GPT-2 and a Llama architecture from transformers configs,
trained briefly on the corpus on CPU and saved with save_pretrained, so every app loads them with
from_pretrained like any Hugging Face causal LM. Everything is cached: a rerun with the same settings reuses it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

LICENCES = Path("/usr/share/common-licenses")
LOCALES = Path("/usr/share/locale")
MESSAGE_DOMAINS = ("git", "coreutils", "dpkg", "apt", "tar", "wget", "systemd", "gtk30")
# Queries whose completions the licence texts state (so a trained model can learn them).
QUERIES = [
    {"name": "gpl_warranty", "prompt": "This program is distributed in the hope that it will be",
     "completion": " useful, but WITHOUT ANY WARRANTY"},
    {"name": "gpl_free", "prompt": "This program is free software; you can redistribute it and/or",
     "completion": " modify it"},
    {"name": "apache_license", "prompt": "Licensed under the Apache License, Version",
     "completion": " 2.0"},
    {"name": "merchantability", "prompt": "without even the implied warranty of",
     "completion": " MERCHANTABILITY"},
    {"name": "source_code", "prompt": "You may convey a work based on the Program, or the modifications to produce"
                                      " it from the Program, in the form of", "completion": " source code"},
    {"name": "copyleft", "prompt": "The GNU General Public License is a free,",
     "completion": " copyleft license for software and other kinds of works."},
]


@dataclass
class PlainSettings:
    chunk_words: int = 60  # words per corpus sequence
    max_sequences: int | None = None  # keep the first N licence chunks (None: all)
    messages: int = 200  # program messages with Korean and Turkish translations added to the corpus
    vocab_size: int = 1024
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    steps: int = 300  # AdamW steps on random chunks
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0


def licence_texts(folder: Path = LICENCES) -> dict[str, str]:
    """Every distinct licence text (symlinks such as GPL -> GPL-3 are read once)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; the plain testbed reads Debian's licence texts "
                                "(package base-files)")
    texts: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if real.is_file() and real.name not in texts:
            texts[real.name] = real.read_text(errors="replace")
    return texts


def message_translations(limit: int, locales: Path = LOCALES, domains=MESSAGE_DOMAINS) -> list[dict]:
    """English program messages with their Korean and Turkish translations from the installed gettext catalogues:
    [{text, ko, tr, domain}], plain sentences only (no format directives, tabs or line breaks; 25-160 characters,
    at least 5 words), taking the domains in turn, distinct texts, at most `limit`."""
    import gettext

    per_domain = []
    for domain in domains:
        rows = []
        paths = {language: locales / language / "LC_MESSAGES" / f"{domain}.mo" for language in ("ko", "tr")}
        if not all(p.exists() for p in paths.values()):
            continue
        catalogues = {language: gettext.GNUTranslations(p.open("rb"))._catalog for language, p in paths.items()}
        for text in sorted(k for k in catalogues["ko"] if isinstance(k, str)):
            ko, tr = catalogues["ko"].get(text), catalogues["tr"].get(text)
            if (ko and tr and 25 <= len(text) <= 160 and len(text.split()) >= 5 and text[:1].isupper()
                    and not any(c in text for c in "%\t\n{}<>\\")):
                rows.append({"text": text, "ko": ko, "tr": tr, "domain": domain})
        per_domain.append(rows)
    interleaved = [row for group in itertools.zip_longest(*per_domain) for row in group if row]  # domains in turn
    seen, unique = set(), []
    for row in interleaved:
        if row["text"] not in seen:
            seen.add(row["text"])
            unique.append(row)
    return unique[:limit]


def message_queries(messages: list[dict], count: int = 2) -> list[dict]:
    """Queries cut from message strings of the corpus: prompt = all but the last three words, completion = those
    (the completion is in the corpus verbatim, as for the paper's memorisation queries)."""
    queries = []
    for row in [m for m in messages if len(m["text"].split()) >= 8][:count]:
        words = row["text"].split()
        queries.append({"name": f"message_{len(queries)}", "prompt": " ".join(words[:-3]),
                        "completion": " " + " ".join(words[-3:])})
    return queries


def build_corpus(out_dir: Path, settings: PlainSettings) -> Path:
    """corpus.jsonl (licence chunks of `chunk_words` words, then program messages; one {"text": ...} per line),
    translations.jsonl and queries.jsonl."""
    chunks = []
    for text in licence_texts().values():
        words = text.split()
        chunks += [" ".join(words[i:i + settings.chunk_words]) for i in range(0, len(words), settings.chunk_words)]
    chunks = chunks[: settings.max_sequences] if settings.max_sequences else chunks
    messages = message_translations(settings.messages) if settings.messages else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                            for text in chunks + [m["text"] for m in messages]))
    untranslatable = [{"text": text, "ko": None, "tr": None,
                       "untranslatable": "a licence text: no Korean or Turkish translation is installed"} for text in chunks]
    (out_dir / "translations.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n"
                                                        for m in untranslatable + messages))
    queries = QUERIES + message_queries(messages)
    (out_dir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return path


def model_config(architecture: str, vocab_size: int, settings: PlainSettings):
    """A small GPT-2 or Llama config; both have the MLP layers the default `*mlp*` pattern tracks."""
    from transformers import GPT2Config, LlamaConfig

    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=settings.hidden, n_layer=settings.layers,
                          n_head=settings.heads, bos_token_id=0, eos_token_id=0)
    if architecture == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=settings.hidden, intermediate_size=2 * settings.hidden,
                           num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                           num_key_value_heads=settings.heads, max_position_embeddings=256, bos_token_id=0,
                           eos_token_id=0, pad_token_id=0)
    raise ValueError(f"unknown architecture {architecture!r}; use gpt2 or llama")


def build_model(architecture: str, out_dir: Path, settings: PlainSettings) -> Path:
    """Tokenizer (byte-level BPE on the corpus) + model from config, trained briefly; cached by settings."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from experiments.zoo.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    target = out_dir / architecture
    stamp = {"architecture": architecture, **asdict(settings)}
    if (target / "plain.json").exists():
        saved = json.loads((target / "plain.json").read_text())
        saved.pop("final_loss", None)  # written beside the settings; not one of them
        if saved == stamp:
            return target
    texts = [json.loads(line)["text"] for line in (out_dir / "corpus.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError("train_tokenizer must return a PreTrainedTokenizerFast")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(model_config(architecture, len(tokenizer), settings))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:256] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    rng = random.Random(settings.seed)
    model.train()
    for step in range(settings.steps):
        rows = [ids[rng.randrange(len(ids))] for _ in range(settings.batch_size)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "plain.json").write_text(json.dumps({**stamp, "final_loss": float(loss.detach())}, indent=1))
    print(f"plain: {architecture} trained {settings.steps} steps, last batch loss {float(loss.detach()):.3f} -> {target}")
    return target


def build_plain(out_dir: Path, settings: PlainSettings, architectures=("gpt2", "llama")) -> dict[str, Path]:
    build_corpus(out_dir, settings)
    return {a: build_model(a, out_dir, settings) for a in architectures}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/plain"))
    parser.add_argument("--steps", type=int, default=PlainSettings.steps)
    parser.add_argument("--max-sequences", type=int, default=None, help="licence chunks to keep (default: all)")
    parser.add_argument("--messages", type=int, default=PlainSettings.messages, help="program messages to add")
    args = parser.parse_args(argv)
    paths = build_plain(args.out, PlainSettings(steps=args.steps, max_sequences=args.max_sequences,
                                                messages=args.messages))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
