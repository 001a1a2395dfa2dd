"""Every scale trains the tokenizers it compares on the same kind of reconstruction loss (issue 16).

Stage 2 of the semantic-detail tokenizer is the paper's Eq. 9: L2 + GAN on the full decode, the perceptual loss only in
the interleaved semantic steps. A scale that switches the GAN off must give those joint steps the perceptual term the
single codebook trains with; otherwise the dual tokenizer's full decode learns from L2 alone (blurry: at the default
scale PSNR 21.5 against 17.2, rFID 8.0 against 7.0) and Tables 7 and 13 compare loss functions, not codebooks.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from iar2.registry import load_plan, load_yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["ci", "default", "paper"])
def test_dual_stage2_has_a_perceptual_or_adversarial_term_like_the_single_codebook(name):
    plan = load_plan(ROOT, load_yaml(ROOT / "params" / f"{name}.yaml"))
    single = plan.tokenizer_config("vq-16384", "single")["loss"]
    joint = plan.tokenizer_config("sd-256-4096", "stage2")["loss"]
    assert single["disc_weight"] == joint["disc_weight"]  # the same adversarial term on both
    if joint["disc_weight"] == 0:
        assert joint["joint_perceptual_weight"] == single["perceptual_weight"] > 0
    else:
        assert single["perceptual_weight"] > 0 or single["disc_weight"] > 0
