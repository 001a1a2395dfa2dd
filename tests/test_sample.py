"""`iar2 sample`: sharded over jobs equals one process, resumes without redoing chunks, ADM .npz layout."""
import numpy as np
import pytest
import torch

from iar2.ar.model import ARModel, ARModelConfig
from iar2.checkpoint import save_weights
from iar2.config import from_dict, load_config, to_dict
from iar2.sample import sample_run
from iar2.sample_config import SampleRunConfig
from iar2.tokenizer.config import VQModelConfig
from iar2.tokenizer.vq_model import VQModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vcfg = VQModelConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=8, norm_groups=4,
                         quantizer="semantic_detail", semantic_size=16, detail_size=64)
    torch.manual_seed(0)
    save_weights(root / "vq.safetensors", VQModel(vcfg).state_dict(), {"model_config": to_dict(vcfg)})
    acfg = from_dict(ARModelConfig, dict(dim=32, n_layer=2, n_head=2, paradigm="fused_hierarchical", semantic_size=16,
                                         detail_size=64, head_layers=1, grid=4, num_classes=3))
    ar = ARModel(acfg)
    for p in ar.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_weights(root / "ar.safetensors", ar.state_dict(), {"model_config": to_dict(acfg)})
    return root / "ar.safetensors", root / "vq.safetensors"


def cfg(**kw):
    return load_config(SampleRunConfig, data={"per_class": 3, "batch_size": 2, "chunk_size": 4,
                                              "sampling": {"seed": 7, "guidance": {"mode": "pag"}}, **kw})


def test_two_jobs_equal_one_process_and_npz_layout(models, tmp_path):
    ar, vq = models
    one = sample_run(ar, vq, tmp_path / "one", cfg())
    assert sample_run(ar, vq, tmp_path / "two", cfg(), job=0, jobs=2) is None  # job 0 alone: not complete
    two = sample_run(ar, vq, tmp_path / "two", cfg(), job=1, jobs=2)  # the last job merges
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].shape == (9, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # a different batch size gives the same images (per-sample randomness)
    c = np.load(sample_run(ar, vq, tmp_path / "three", cfg(batch_size=3)))
    assert np.array_equal(a["arr_0"], c["arr_0"])


def test_resume_redoes_only_missing_chunks(models, tmp_path):
    ar, vq = models
    first = np.load(sample_run(ar, vq, tmp_path / "whole", cfg()))["arr_0"]
    assert not (tmp_path / "whole" / "chunks").exists()  # merged: the chunks are in samples.npz now
    out = tmp_path / "run"
    assert sample_run(ar, vq, out, cfg(), job=0, jobs=2) is None  # chunks 0 and 2 done, as if killed then
    seen = []
    import iar2.sample as sample_mod

    real = sample_mod.generate
    sample_mod.generate = lambda model, labels, idx, sc: seen.extend(idx.tolist()) or real(model, labels, idx, sc)
    try:
        again = np.load(sample_run(ar, vq, out, cfg()))["arr_0"]
    finally:
        sample_mod.generate = real
    assert sorted(seen) == [4, 5, 6, 7]  # chunks 0 and 2 were reused: only chunk 1's samples were drawn
    assert np.array_equal(first, again)


def test_eval_resize_and_class_subset(models, tmp_path):
    ar, vq = models
    out = np.load(sample_run(ar, vq, tmp_path / "r", cfg(eval_size=8, classes=[2], per_class=2)))
    assert out["arr_0"].shape == (2, 8, 8, 3) and out["arr_1"].tolist() == [2, 2]


def test_reject_sampling_keeps_the_best_scored_candidates_per_class(models, tmp_path):
    from iar2.refnet import RefNet, RefNetConfig
    from iar2.reject_sampling import select

    # selection rule: top per_class by score within each class, ties by index
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.2, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert select(scores, labels, np.arange(6), 2).tolist() == [1, 2, 3, 5]
    ar, vq = models
    torch.manual_seed(0)
    rcfg = RefNetConfig(num_classes=3, input_size=16, widths=(8, 16), blocks=1, norm_groups=4)
    save_weights(tmp_path / "ref.safetensors", RefNet(rcfg).state_dict(), {"model_config": to_dict(rcfg)})
    c = cfg(reject={"factor": 3, "classifier": "domain", "domain_net": str(tmp_path / "ref.safetensors")})
    out = np.load(sample_run(ar, vq, tmp_path / "re", c, grid=3))
    assert out["arr_0"].shape[0] == 9 and out["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    import json

    summary = json.loads((tmp_path / "re" / "samples.json").read_text())
    assert summary["reject_candidates"] == 27
    assert summary["reject_mean_score_kept"] >= summary["reject_mean_score_all"]
    from PIL import Image

    assert Image.open(tmp_path / "re" / "grid.png").size == (3 * 18, 3 * 18)


def _rank_worker(rank, port, ar, vq, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        sample_run(ar, vq, out, cfg())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_torchrun_ranks_equal_one_process(models, tmp_path):
    import socket

    import torch.multiprocessing as mp

    ar, vq = models
    one = np.load(sample_run(ar, vq, tmp_path / "one", cfg()))["arr_0"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(ar), str(vq), str(tmp_path / "ranks")), nprocs=2, join=True)
    assert np.array_equal(one, np.load(tmp_path / "ranks" / "samples.npz")["arr_0"])
