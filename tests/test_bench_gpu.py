"""benchmarks/gpu.py on a machine without CUDA: one line, status 1, nothing measured."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the refusal path does not apply")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr
    assert result.stdout == ""
