"""Codebook usage (iar2.tokenizer.usage): known histograms give known usage and perplexity, and every reader
(tokenizer training, `iar2 vq eval`, `iar2 diagnose`) reports the numbers of that one function."""
import math

import numpy as np
import pytest
import torch

from iar2.tokenizer.usage import code_histogram, usage_stats


def test_known_histograms():
    s = usage_stats([5, 5, 5, 5, 0, 0, 0, 0])  # uniform over half the codes
    assert s["perplexity"] == pytest.approx(4.0) and s["usage"] == 0.5 and s["codes_used"] == 4
    assert s["entropy"] == pytest.approx(math.log(4))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    s = usage_stats([3, 1])
    assert s["entropy"] == pytest.approx(h) and s["perplexity"] == pytest.approx(math.exp(h))
    assert usage_stats([7, 0, 0])["perplexity"] == pytest.approx(1.0)  # a collapsed codebook
    assert usage_stats([0, 0]) == {"usage": 0.0, "codes_used": 0, "entropy": 0.0, "perplexity": 1.0}  # nothing seen


def test_tensor_array_and_list_give_the_same_numbers():
    idx = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    counts = code_histogram(idx.view(10, 10, 10), 64)
    assert counts.shape == (64,) and int(counts.sum()) == 1000
    p = torch.tensor([(idx == i).double().mean() for i in range(64)])
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    s = usage_stats(counts)
    assert s["usage"] == len(idx.unique()) / 64 and s["perplexity"] == pytest.approx(ent.exp().item(), rel=1e-12)
    assert usage_stats(counts.numpy()) == s == usage_stats(counts.tolist())


def test_training_window_and_diagnose_read_the_one_function():
    from iar2.diagnose import entropy_of
    from iar2.distributed import DistInfo
    from iar2.tokenizer.train import CodebookStats

    idx = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    stats = CodebookStats({"single": 16}, torch.device("cpu"))
    stats.update(idx, ["single"])
    s = usage_stats(code_histogram(idx, 16))
    assert stats.summary(DistInfo(device=torch.device("cpu"))) == {"usage_single": s["usage"],
                                                                  "perplexity_single": s["perplexity"]}
    assert entropy_of(idx.numpy(), 16) == s["entropy"]
    assert np.isclose(math.exp(entropy_of(idx.numpy(), 16)), s["perplexity"])
