"""`iar2 bench ...`: benchmarks users run on their own hardware.

Each benchmark is a module of this package (`timing` and `bound` are the AR ones' repeat control and hardware
bound); that module provides `add_bench_arguments(parser)` and `run_bench(args)`. Figures are printed as rates and
as ratios measured in the same run (wall-clock numbers differ between machines; ratios travel).
"""
from __future__ import annotations

import importlib

_BENCHES = {
    "tokenizer": "iar2.bench.tokenizer",  # tokenizer training steps/s
    "tokenize": "iar2.bench.tokenize",  # tokenization images/s
    "kmeans": "iar2.bench.kmeans",  # balanced k-means time on a 16384 x 8 codebook
    "train": "iar2.bench.train",  # AR training tokens/s (and MFU on known GPUs), interleaved repeats
    "sample": "iar2.bench.sample",  # decode ms/step against the weights-read bound, KV speed-up
}


def add_arguments_for(words, parser) -> None:
    importlib.import_module(_BENCHES[words[1]]).add_bench_arguments(parser)


def run_for(words, args):
    return importlib.import_module(_BENCHES[words[1]]).run_bench(args)
