"""Shared test fixtures: a tiny built-in ImageFolder and modest CPU use."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests share two CPU cores with other jobs. One intra-op thread: with more, OpenMP threads spin and wait
# for each other on a busy machine (measured: a small CNN step ran 5x slower with 2 threads than with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder root with train/ (8 per class) and val/ (4 per class), 10 classes, 32 px, seed 0."""
    from iar2.data.builtin import make_builtin

    root = tmp_path_factory.mktemp("tiny_data") / "builtin"
    return make_builtin(root, num_classes=10, train_per_class=8, val_per_class=4, size=32, seed=0)
