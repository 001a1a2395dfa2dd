"""IAR codebook rearrangement: balanced k-means, nearest-neighbour order, mapping files, rearranged VQs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import random_images, tiny_vq
from iar2 import rearrange as R
from iar2.checkpoint import save_weights
from iar2.config import to_dict


def unit_codes(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered_codes(n_clusters: int, m: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Codes around n_clusters well-separated directions (k-means has structure to find)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g)
    x = centres.repeat_interleave(m, 0) + 0.15 * torch.randn(n_clusters * m, d, generator=g)
    return F.normalize(x[torch.randperm(x.shape[0], generator=g)], dim=1)


def greedy_reference(dist: torch.Tensor, m: int) -> torch.Tensor:
    """IAR's assignment written literally: pairs by increasing distance, fill clusters to capacity."""
    n_points, k = dist.shape
    assign, count = [-1] * n_points, [0] * k
    for flat in dist.flatten().argsort(stable=True).tolist():
        p, c = divmod(flat, k)
        if assign[p] < 0 and count[c] < m:
            assign[p], count[c] = c, count[c] + 1
    return torch.tensor(assign)


# ----------------------------------------------------------------------------- balanced assignment / k-means

def test_balanced_assign_equals_greedy_pair_order():
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        k, m = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        x, c = torch.randn(k * m, 3, generator=g), torch.randn(k, 3, generator=g)
        dist = R.squared_distances(x, c)
        assert torch.equal(R.balanced_assign(dist, m), greedy_reference(dist, m))


def test_balanced_assign_rejects_wrong_capacity():
    with pytest.raises(ValueError, match="do not fill"):
        R.balanced_assign(torch.rand(10, 3), 3)


def test_squared_distances_match_direct():
    x, c = torch.randn(20, 5), torch.randn(7, 5)
    torch.testing.assert_close(R.squared_distances(x, c), ((x[:, None].double() - c[None].double()) ** 2).sum(-1))


def test_kmeans_sizes_exactly_equal_and_inertia_consistent():
    x = unit_codes(512)
    km = R.balanced_kmeans(x, 16, max_iter=30, seed=0)
    assert torch.equal(torch.bincount(km.assign, minlength=16), torch.full((16,), 32))
    # inertia = sum of squared distances to the cluster means, recomputed directly (k-means renormalises in fp64)
    x = F.normalize(x.double(), dim=1)
    direct = sum(((x[km.assign == j] - x[km.assign == j].mean(0)) ** 2).sum() for j in range(16))
    assert km.inertia == pytest.approx(float(direct), rel=1e-9)
    assert R.cluster_inertia(x, km.assign, 16) == pytest.approx(km.inertia, rel=1e-9)


def test_kmeans_not_divisible_raises():
    with pytest.raises(ValueError, match="equal clusters"):
        R.balanced_kmeans(unit_codes(100), 16)


def test_kmeans_finds_planted_clusters():
    x = clustered_codes(8, 16, seed=3)
    km = R.balanced_kmeans(x, 8, max_iter=50, seed=0)
    assert km.converged
    truth = R.balanced_kmeans(x, 8, max_iter=50, seed=1).assign
    # two seeds give the same partition (up to cluster numbering): the planted one
    pairs = torch.stack([km.assign, truth], 1).unique(dim=0)
    assert pairs.shape[0] == 8


# ----------------------------------------------------------------------------- the rearrangement

def test_mapping_is_valid_permutation_with_contiguous_clusters():
    x = unit_codes(256, seed=2)
    r = R.rearrange_codebook(x, 8, seed=0, max_iter=30)
    R.check_mapping(r.mapping, 256)
    assert r.cluster_size == 32
    km = R.balanced_kmeans(x, 8, max_iter=30, seed=0)
    # new // m is exactly the k-means partition (clusters renumbered)
    pairs = torch.stack([r.mapping // 32, km.assign], 1).unique(dim=0)
    assert pairs.shape[0] == 8
    assert r.inertia == pytest.approx(km.inertia, rel=1e-9)


def test_inertia_below_random_and_index_order():
    for x in (unit_codes(1024, seed=4), clustered_codes(16, 64, seed=5)):
        r = R.rearrange_codebook(x, 16, seed=0, max_iter=40)
        assert r.inertia < 0.6 * r.inertia_random
        assert r.inertia < 0.6 * r.inertia_before
        assert r.adjacent_after < 0.6 * r.adjacent_before


def test_rearrangement_deterministic_by_seed():
    x = unit_codes(512, seed=6)
    a = R.rearrange_codebook(x, 16, seed=3, max_iter=20)
    b = R.rearrange_codebook(x, 16, seed=3, max_iter=20)
    c = R.rearrange_codebook(x, 16, seed=4, max_iter=20)
    assert torch.equal(a.mapping, b.mapping) and a.inertia == b.inertia
    assert not torch.equal(a.mapping, c.mapping)


def test_within_cluster_order_is_nearest_neighbour_chain():
    x = unit_codes(96, seed=7).double()
    r = R.rearrange_codebook(x, 4, seed=0, max_iter=20, normalize=False)
    e = R.permute_codebook(x, r.mapping)  # rows in new order
    m = r.cluster_size
    for j in range(4):
        block = e[j * m:(j + 1) * m]
        centre = block.mean(0)
        # the chain starts at the code farthest from the cluster mean ...
        assert int(((block - centre) ** 2).sum(1).argmax()) == 0
        # ... and each next code is the nearest one not yet visited
        for i in range(m - 1):
            d = (block[i + 1:] - block[i]).norm(dim=1)
            assert float(d[0]) == pytest.approx(float(d.min()), abs=1e-12)


def test_nearest_neighbour_chains_batched_matches_single():
    pts = torch.randn(5, 12, 3, generator=torch.Generator().manual_seed(8))
    start = torch.tensor([0, 3, 11, 5, 7])
    batched = R.nearest_neighbour_chains(pts, start)
    for b in range(5):
        assert torch.equal(batched[b], R.nearest_neighbour_chains(pts[b:b + 1], start[b:b + 1])[0])
        assert sorted(batched[b].tolist()) == list(range(12)) and batched[b, 0] == start[b]


# ----------------------------------------------------------------------------- permutations and tokens

def test_token_remap_and_codebook_permutation_agree():
    g = torch.Generator().manual_seed(9)
    mapping = torch.randperm(64, generator=g)
    e_old = torch.randn(64, 8, generator=g)
    e_new = R.permute_codebook(e_old, mapping)
    assert torch.equal(e_new[mapping], e_old)  # E_new[mapping[i]] = E_old[i]
    tokens = torch.randint(0, 64, (3, 4, 4), generator=g)
    new = R.to_new(tokens, mapping)
    assert torch.equal(e_new[new], e_old[tokens])
    assert torch.equal(R.to_old(new, mapping), tokens)
    assert torch.equal(R.inverse(mapping), mapping.argsort())
    dual = torch.stack([tokens % 16, tokens], 1)
    out = R.remap_level(dual, mapping, "detail")
    assert torch.equal(out[:, 0], dual[:, 0]) and torch.equal(out[:, 1], new)
    assert torch.equal(R.remap_level(out, mapping, "detail", old_to_new=False), dual)


def test_check_mapping_rejects_non_permutations():
    with pytest.raises(ValueError, match="permutation"):
        R.check_mapping(torch.tensor([0, 1, 1, 3]))
    with pytest.raises(ValueError, match="int64"):
        R.check_mapping(torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="codebook has"):
        R.check_mapping(torch.arange(4), 5)


# ----------------------------------------------------------------------------- mapping files

def test_mapping_file_round_trip_ours(tmp_path):
    r = R.rearrange_codebook(unit_codes(128, seed=10), 4, seed=0, max_iter=10)
    R.save_mapping(tmp_path / "m.safetensors", r.mapping, r.info())
    mapping, info = R.load_mapping(tmp_path / "m.safetensors", 128)
    assert torch.equal(mapping, r.mapping)
    assert info["n_clusters"] == 4 and info["cluster_size"] == 32 and info["seed"] == 0
    assert info["inertia"] == pytest.approx(r.inertia)


def test_mapping_file_iar_format_with_storage_offset(tmp_path):
    # Like IAR's published file: a view at storage offset N into a 2N int64 storage whose first half is arange(N)
    n = 256
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11))
    both = torch.stack([torch.arange(n), perm])
    view = both[1]
    assert view.storage_offset() == n
    torch.save(view, tmp_path / "mapping-kmeans+nearest.pt")
    mapping, info = R.load_mapping(tmp_path / "mapping-kmeans+nearest.pt", n)
    assert torch.equal(mapping, perm) and info == {}
    assert mapping.storage_offset() == 0 and mapping.untyped_storage().nbytes() == n * 8

    # our writer produces the same format: a bare tensor that loads with weights_only=True
    R.save_mapping_iar(tmp_path / "ours.pt", mapping)
    loaded = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert torch.is_tensor(loaded) and loaded.dtype == torch.long and torch.equal(loaded, perm)


def test_mapping_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="iar2 rearrange"):
        R.load_mapping(tmp_path / "missing.pt")
    torch.save({"mapping": torch.arange(4)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="bare LongTensor"):
        R.load_mapping(tmp_path / "dict.pt")
    torch.save(torch.arange(8), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="codebook has 16"):
        R.load_mapping(tmp_path / "short.pt", 16)


# ----------------------------------------------------------------------------- rearranged tokenizers

@pytest.mark.parametrize("quantizer,level,clusters", [("single", "single", 8), ("semantic_detail", "detail", 8),
                                                      ("semantic_detail", "semantic", 4),
                                                      ("unassociated_dual", "detail", 8)])
def test_rearranged_vq_decodes_remapped_codes_identically(tmp_path, quantizer, level, clusters):
    from iar2.tokenizer.vq_model import load_vq

    model = tiny_vq(quantizer)
    r = R.rearrange_codebook(model.codebook_vectors(level), clusters, seed=0, max_iter=20, normalize=False)
    R.write_rearranged_vq(model, tmp_path / "vq.safetensors", level, r.mapping)
    new = load_vq(tmp_path / "vq.safetensors")
    x = random_images(3)
    old_idx = model.encode_indices(x)
    new_idx = R.remap_level(old_idx, r.mapping, level)
    assert not torch.equal(new_idx, old_idx)
    assert torch.equal(new.decode_indices(new_idx), model.decode_indices(old_idx))
    # the rearranged tokenizer also encodes straight to the new numbering
    assert torch.equal(new.encode_indices(x), new_idx)
    assert torch.equal(new.codebook_vectors(level), R.permute_codebook(model.codebook_vectors(level), r.mapping))
    meta = json.loads((tmp_path / "vq.json").read_text())
    assert meta["rearranged"]["level"] == level


def test_codebook_key_rejects_wrong_level():
    with pytest.raises(ValueError, match="does not fit"):
        R.codebook_key(tiny_vq("single"), "detail")


def test_cli_rearrange_and_apply_iar_mapping(tmp_path):
    from iar2.cli import main
    from iar2.tokenizer.vq_model import load_vq

    model = tiny_vq("single", seed=1)
    save_weights(tmp_path / "vq.safetensors", model.state_dict(), {"model_config": to_dict(model.cfg)})
    out = tmp_path / "rearranged"
    assert main(["rearrange", "--vq", str(tmp_path / "vq.safetensors"), "--clusters", "8", "--out", str(out),
                 "--max-iter", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["level"] == "single" and summary["n_clusters"] == 8 and summary["cluster_size"] == 8
    assert summary["inertia"] < summary["inertia_random"] and summary["inertia"] < summary["inertia_before"]
    mapping, info = R.load_mapping(out / "mapping.safetensors", 64)
    assert torch.equal(torch.load(out / "mapping.pt", weights_only=True), mapping)
    assert info["inertia"] == summary["inertia"]
    x = random_images(3, seed=2)
    old_idx = model.encode_indices(x)
    new = load_vq(out / "vq.safetensors")
    assert torch.equal(new.decode_indices(R.to_new(old_idx, mapping)), model.decode_indices(old_idx))

    # applying the IAR-format file to the original VQ reproduces the same rearranged tokenizer
    out2 = tmp_path / "applied"
    assert main(["rearrange", "--vq", str(tmp_path / "vq.safetensors"), "--mapping", str(out / "mapping.pt"),
                 "--clusters", "8", "--out", str(out2)]) == 0
    again = load_vq(out2 / "vq.safetensors")
    for k, v in new.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert json.loads((out2 / "summary.json").read_text())["inertia"] == pytest.approx(summary["inertia"])

    # a cluster count that does not divide the codebook is a configuration error (exit code 2)
    assert main(["rearrange", "--vq", str(tmp_path / "vq.safetensors"), "--clusters", "7", "--out",
                 str(tmp_path / "bad")]) == 2


def test_bench_runs_and_reports(capsys):
    import argparse

    from iar2.bench import kmeans

    p = argparse.ArgumentParser()
    kmeans.add_bench_arguments(p)
    assert kmeans.run_bench(p.parse_args(["--codes", "256", "--clusters", "8", "--max-iter", "5"])) == 0
    out = capsys.readouterr().out
    assert "N=256" in out and "iterations" in out and "random balanced" in out
