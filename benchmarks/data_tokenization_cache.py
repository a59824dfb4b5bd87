"""Tokenisation time of real data with and without the cache: SQuAD v1.1 train (11,877 rows, automodel's cache)
and Alpaca (999 rows, the `datasets` cache), stories260K tokenizer, seq_length 512. Prints one line per case.

    PYTHONPATH=$PWD python benchmarks/data_tokenization_cache.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from automodel.data.instruction import make_instruction_dataset
from automodel.data.squad import make_squad_dataset
from automodel.models import load_tokenizer

ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


def timed(label: str, build) -> None:
    start = time.perf_counter()
    dataset = build()
    print(f"{label:<42} {time.perf_counter() - start:7.2f} s  {len(dataset):6d} examples", flush=True)


def main() -> None:
    tokenizer = load_tokenizer(str(ASSETS / "models" / "stories260K"))
    squad = str(ASSETS / "squad_v1.1" / "train-v1.1.subset.json")
    alpaca = str(ASSETS / "instruct" / "alpaca_en_demo.json")
    with tempfile.TemporaryDirectory() as cache:
        timed("SQuAD train, no cache", lambda: make_squad_dataset(tokenizer, squad, seq_length=512, cache=False))
        timed("SQuAD train, first run (tokenize + write)",
              lambda: make_squad_dataset(tokenizer, squad, seq_length=512, cache_dir=cache))
        timed("SQuAD train, second run (cache hit)",
              lambda: make_squad_dataset(tokenizer, squad, seq_length=512, cache_dir=cache))
        timed("Alpaca, first run (datasets: convert + map)",
              lambda: make_instruction_dataset(tokenizer, alpaca, seq_length=512, cache_dir=cache))
        timed("Alpaca, second run (datasets cache hit)",
              lambda: make_instruction_dataset(tokenizer, alpaca, seq_length=512, cache_dir=cache))


if __name__ == "__main__":
    main()
