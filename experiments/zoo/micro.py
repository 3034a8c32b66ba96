"""The micro zoo: a tiny world, tokenizer and 2-layer GPT-NeoX, built in seconds for tests and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from experiments.zoo.queries import Query

MICRO_VOCAB_SIZE = 512


@dataclass
class MicroZoo:
    """Paths of a built micro zoo; every path loads with the Hugging Face / datasets calls.

    model_path: ``AutoModelForCausalLM.from_pretrained(model_path)`` (the tokenizer is saved there too).
    tokenizer_path: ``AutoTokenizer.from_pretrained(tokenizer_path)``.
    dataset_path: ``datasets.load_from_disk(dataset_path)`` -> DatasetDict(train, validation).
    queries: the world's queries (``experiments.zoo.queries.Query``), also saved at queries_path.
    """

    root: Path
    model_path: Path
    tokenizer_path: Path
    dataset_path: Path
    queries_path: Path
    queries: list[Query] = field(default_factory=list)
    train_result: dict = field(default_factory=dict)


def micro_train_config():
    from experiments.zoo.train import TrainConfig

    return TrainConfig(block_size=128, max_position_embeddings=256, batch_size=8, epochs=3.0, warmup_steps=10,
                       checkpoint_every=10**9, eval_every=10**9, seed=0, threads=1, progress=False)


def build_micro_zoo(root: Path) -> MicroZoo:
    """Build (or reuse) the micro world, tokenizer and model under ``root``. Idempotent."""
    import dataclasses

    from experiments.zoo.build import build_world_and_queries
    from experiments.zoo.tokenizer import build_tokenizer
    from experiments.zoo.train import SIZES, train_model

    root = Path(root)
    dataset_path, queries_path, queries = build_world_and_queries("micro", root / "world")
    tokenizer_path = build_tokenizer(dataset_path, root / "tokenizer", vocab_size=MICRO_VOCAB_SIZE)
    result = train_model(SIZES["micro"], tokenizer_path, dataset_path, root / "model", micro_train_config())
    if not (root / "model" / "known_facts.json").exists():  # what the studies read to report on known facts
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from experiments.zoo import world as W
        from experiments.zoo.build import write_known_facts
        from experiments.zoo.queries import competence_queries
        from experiments.zoo.train import ranking_hits

        competence = competence_queries(W.world_config("micro"), queried_only=False)
        hits = ranking_hits(AutoModelForCausalLM.from_pretrained(result.model_path),
                            AutoTokenizer.from_pretrained(result.model_path), competence)
        write_known_facts(competence, hits, root / "model")
    return MicroZoo(root=root, model_path=Path(result.model_path), tokenizer_path=tokenizer_path, dataset_path=dataset_path,
                    queries_path=queries_path, queries=queries, train_result=dataclasses.asdict(result))
