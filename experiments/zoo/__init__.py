"""Synthetic world, tokenizer and a GPT-NeoX model zoo trained on CPU (issue 3)."""

from experiments.zoo.micro import MicroZoo, build_micro_zoo  # noqa: F401
