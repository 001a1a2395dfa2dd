"""Quantiser maths against direct computation: argmin, residual sum, losses, straight-through, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iar2.tokenizer.semantic_detail_quantizer import (SemanticDetailQuantizer, SingleQuantizer,
                                                      UnassociatedDualQuantizer, nearest_code)


def _latent(seed: int = 0, b: int = 2, c: int = 8, h: int = 4, w: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


def _tokens(h: torch.Tensor, l2: bool = True) -> torch.Tensor:
    z = h.permute(0, 2, 3, 1)
    return F.normalize(z, dim=-1) if l2 else z


def _randomise(q: torch.nn.Module, seed: int = 1) -> None:
    # codebooks spread like trained ones (the uniform init puts all codes very close together)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------- nearest code

@pytest.mark.parametrize("max_elements", [1 << 24, 100, 1])  # one chunk, many chunks, one row per chunk
def test_nearest_code_matches_brute_force(max_elements):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(97, 8, generator=g), torch.randn(300, 8, generator=g)
    want = torch.cdist(z.double(), e.double()).argmin(1)
    assert torch.equal(nearest_code(z, e, max_elements=max_elements), want)


def test_nearest_code_largest_codebook_is_chunked():
    # 262144 codes: 64 rows per chunk, never a (tokens x codes) matrix
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(262144, 8, generator=g), dim=-1)
    z = F.normalize(torch.randn(150, 8, generator=g), dim=-1)
    want = torch.stack([(e - zi).pow(2).sum(1).argmin() for zi in z])
    assert torch.equal(nearest_code(z, e), want)


# ----------------------------------------------------------------------------- single codebook

def test_single_forward_matches_direct_formulas():
    q = SingleQuantizer(64, 8, beta=0.25)
    _randomise(q)
    h = _latent()
    out = q(h)
    z, e = _tokens(h), F.normalize(q.codebook.weight, dim=-1)
    want_idx = torch.cdist(z.reshape(-1, 8).double(), e.double()).argmin(1).view(2, 4, 5)
    assert out.indices.shape == (2, 4, 5) and out.indices.dtype == torch.long
    assert torch.equal(out.indices, want_idx)
    c = e[want_idx]
    torch.testing.assert_close(out.z_q, c.permute(0, 3, 1, 2))
    vq, commit = ((c - z) ** 2).mean(), 0.25 * ((c - z) ** 2).mean()
    torch.testing.assert_close(out.codebook_loss, vq)
    torch.testing.assert_close(out.commit_loss, commit)
    torch.testing.assert_close(out.loss, vq + commit)
    # lookup from indices reproduces the forward codes
    torch.testing.assert_close(q.lookup(out.indices), out.z_q)


def test_single_init_is_normalised_uniform():
    torch.manual_seed(0)
    q = SingleQuantizer(256, 8)
    torch.testing.assert_close(q.codebook.weight.norm(dim=1), torch.ones(256))


def test_straight_through_gradient_is_identity():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 8, 4, 5, generator=g)
    # without l2 normalisation: d z_q / d h is exactly the identity
    q = SingleQuantizer(64, 8, l2_norm=False)
    _randomise(q)
    h = _latent().requires_grad_(True)
    (q(h).z_q * w).sum().backward()
    torch.testing.assert_close(h.grad, w)
    # with it: identity w.r.t. the normalised latent z, i.e. the same gradient as sum(w * z)
    q = SingleQuantizer(64, 8)
    h1 = _latent().requires_grad_(True)
    (q(h1).z_q * w).sum().backward()
    h2 = _latent().requires_grad_(True)
    (F.normalize(h2, dim=1) * w).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad)


@pytest.mark.parametrize("make,mode", [
    (lambda: SingleQuantizer(64, 8, l2_norm=False), "full"),
    (lambda: SemanticDetailQuantizer(16, 64, 8, l2_norm=False), "full"),
    (lambda: SemanticDetailQuantizer(16, 64, 8, l2_norm=False), "semantic"),
    (lambda: UnassociatedDualQuantizer((16, 64), 8, l2_norm=False), "full"),
], ids=["single", "dual", "dual-semantic", "unassociated"])
def test_straight_through_is_z_plus_sg_c_minus_z(make, mode):
    # Eq. 7/9: z_q = z + sg(c - z). A loss on z_q (reconstruction, perceptual, GAN) moves the encoder output with
    # the identity gradient and never the codebooks; they learn only through the codebook loss.
    # (no l2 normalisation, so the encoder output is z itself)
    q = make()
    _randomise(q)
    h = _latent().requires_grad_(True)
    w = torch.randn(2, 8, 4, 5, generator=torch.Generator().manual_seed(7))
    out = q(h, mode=mode)
    (out.z_q * w).sum().backward()
    torch.testing.assert_close(h.grad, w)
    for p in q.parameters():
        assert p.grad is None or torch.all(p.grad == 0)
    # the forward value is the codes exactly: decoding a forward pass equals decoding its indices
    assert torch.equal(out.z_q, q.lookup(out.indices, mode=mode))


def test_loss_terms_reach_the_right_parameters():
    q = SingleQuantizer(64, 8)
    _randomise(q)
    h = _latent().requires_grad_(True)
    out = q(h)
    out.codebook_loss.backward(retain_graph=True)  # moves codes only
    assert h.grad is None or torch.all(h.grad == 0)
    grad_rows = q.codebook.weight.grad.abs().sum(1) > 0
    used = torch.zeros(64, dtype=torch.bool)
    used[out.indices.unique()] = True
    assert torch.equal(grad_rows, used)  # only the selected codes move
    q.zero_grad()
    out.commit_loss.backward()  # moves the encoder only
    assert h.grad.abs().sum() > 0
    assert q.codebook.weight.grad is None or torch.all(q.codebook.weight.grad == 0)


def test_single_rejects_semantic_mode():
    with pytest.raises(ValueError, match="mode"):
        SingleQuantizer(16, 8)(_latent(), mode="semantic")


def test_quantizer_runs_in_fp32_under_autocast():
    q = SingleQuantizer(64, 8)
    _randomise(q)
    h = _latent()
    ref = q(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(h)
    assert out.z_q.dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)


# ----------------------------------------------------------------------------- semantic-detail associated

def _dual(beta=0.25, semantic_commit_weight=0.0):
    q = SemanticDetailQuantizer(16, 64, 8, beta=beta, semantic_commit_weight=semantic_commit_weight)
    _randomise(q)
    return q


def test_dual_indices_residual_sum_and_eq10():
    q = _dual()
    h = _latent()
    out = q(h)
    z = _tokens(h)
    e_s, e_d = F.normalize(q.semantic_codebook.weight, dim=-1), q.detail_codebook.weight  # detail used raw
    flat = z.reshape(-1, 8).double()
    k = torch.cdist(flat, e_s.double()).argmin(1)  # Eq. 5
    r = flat - e_s.double()[k]
    j = torch.cdist(r, e_d.double()).argmin(1)  # Eq. 6 on the residual
    assert out.indices.shape == (2, 2, 4, 5)
    assert torch.equal(out.indices[:, 0].reshape(-1), k) and torch.equal(out.indices[:, 1].reshape(-1), j)
    assert out.indices[:, 0].max() < 16 and out.indices[:, 1].max() < 64 and out.indices.min() >= 0
    c = (e_s[k] + e_d[j]).view(2, 4, 5, 8)  # z_q = c_s + c_d
    torch.testing.assert_close(out.z_q, c.permute(0, 3, 1, 2))
    torch.testing.assert_close(q.lookup(out.indices), out.z_q)
    # Eq. 10: ||sg[e] - (c_s + c_d)||^2 + beta ||e - sg[c_s + c_d]||^2
    torch.testing.assert_close(out.codebook_loss, ((c - z) ** 2).mean())
    torch.testing.assert_close(out.commit_loss, 0.25 * ((c - z) ** 2).mean())


def test_dual_semantic_mode_is_eq7_eq8():
    q = _dual()
    h = _latent()
    full, sem = q(h), q(h, mode="semantic")
    assert torch.equal(full.indices, sem.indices)  # same layout and codes in both modes
    z = _tokens(h)
    c_s = F.normalize(q.semantic_codebook.weight, dim=-1)[sem.indices[:, 0]]
    torch.testing.assert_close(sem.z_q, c_s.permute(0, 3, 1, 2))
    torch.testing.assert_close(sem.loss, 1.25 * ((c_s - z) ** 2).mean())  # Eq. 8, beta 0.25
    torch.testing.assert_close(q.lookup(sem.indices, mode="semantic"), sem.z_q)
    torch.testing.assert_close(q.lookup(sem.indices[:, 0], mode="semantic"), sem.z_q)


def test_dual_semantic_commit_weight_adds_eq8():
    h = _latent()
    base, extra = _dual()(h), _dual(semantic_commit_weight=0.5)(h)
    sem = _dual()(h, mode="semantic")
    torch.testing.assert_close(extra.loss, base.loss + 0.5 * sem.loss)


def test_dual_gradients_reach_the_right_codebooks():
    q = _dual()
    h = _latent().requires_grad_(True)
    q(h, mode="semantic").loss.backward()  # stage 1: the detail codebook is not involved
    assert q.semantic_codebook.weight.grad.abs().sum() > 0
    assert q.detail_codebook.weight.grad is None or torch.all(q.detail_codebook.weight.grad == 0)
    q.zero_grad()
    h.grad = None
    q(h).loss.backward()  # stage 2: both codebooks and the encoder
    assert q.semantic_codebook.weight.grad.abs().sum() > 0
    assert q.detail_codebook.weight.grad.abs().sum() > 0
    assert h.grad.abs().sum() > 0
    assert q.semantic_parameters() == [q.semantic_codebook.weight]
    assert q.detail_parameters() == [q.detail_codebook.weight]


def test_dual_residual_quantisation_never_worse_with_a_zero_detail_code():
    q = _dual()
    with torch.no_grad():
        q.detail_codebook.weight[0] = 0.0  # the detail level may then always "add nothing"
    h = _latent()
    z = _tokens(h).permute(0, 3, 1, 2)
    err_full = (q(h).z_q - z).pow(2).sum(1)
    err_sem = (q(h, mode="semantic").z_q - z).pow(2).sum(1)
    assert torch.all(err_full <= err_sem + 1e-6)
    assert err_full.mean() < err_sem.mean()


# ----------------------------------------------------------------------------- unassociated dual

def test_unassociated_quantises_channel_halves_independently():
    q = UnassociatedDualQuantizer((16, 64), 8)
    _randomise(q)
    h = _latent()
    out = q(h)
    assert out.indices.shape == (2, 2, 4, 5)
    for i, (cb, part) in enumerate(zip(q.codebooks, h.split(4, dim=1))):
        z = _tokens(part)
        e = F.normalize(cb.codebook.weight, dim=-1)
        idx = torch.cdist(z.reshape(-1, 4).double(), e.double()).argmin(1)
        assert torch.equal(out.indices[:, i].reshape(-1), idx)
        torch.testing.assert_close(out.z_q[:, 4 * i:4 * i + 4], e[idx].view(2, 4, 5, 4).permute(0, 3, 1, 2))
    torch.testing.assert_close(q.lookup(out.indices), out.z_q)
    with pytest.raises(ValueError, match="mode"):
        q(h, mode="semantic")
