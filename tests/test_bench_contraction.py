"""benchmarks/rank32_contraction.py: its two paths compute the same scores (the printed difference is small)."""

import re

from benchmarks.rank32_contraction import main


def test_factored_and_rebuilt_paths_agree_on_a_tiny_shape(capsys):
    main(["--shapes", "8x5", "--queries", "3", "--rank", "2", "--batch", "2", "--tokens", "3", "--repeats", "1",
          "--chunk-bytes", "1"])
    out = capsys.readouterr().out
    assert {"factored", "rebuilt", "forming D"} <= set(re.findall(r"8x5 (factored|rebuilt|forming D)", out))
    difference = float(re.search(r"factored vs rebuilt: (\S+)", out).group(1))
    assert difference < 1e-5
