"""Tokenizer training: learning, the dual-codebook stages, exact resumption, config errors."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import helpers
from helpers import random_images
from iar2.checkpoint import latest_checkpoint, load_weights
from iar2.config import ConfigError
from iar2.distributed import DistInfo
from iar2.io import atomic_write_text
from iar2.tokenizer.config import TokenizerRunConfig
from iar2.tokenizer.train import VQTrainer, config_changes, train
from iar2.training import NonFiniteError

SIZE = 16  # px: 4x4 tokens
# this module's runs, over helpers.make_cfg's tiny VQ at SIZE px: 10 steps at lr 1e-3, checkpoints every 5
RUN_BASE = {"data": {"image_size": SIZE, "crop_min": 0.8},
            "train": {"steps": 10, "lr": 1e-3, "log_every": 5, "ckpt_every": 5}}


def make_cfg(root, **sections) -> TokenizerRunConfig:
    return helpers.make_cfg(root, RUN_BASE, **sections)


def val_images(root) -> torch.Tensor:
    from iar2.data.imagefolder import ImageFolderDataset
    from iar2.data.transforms import eval_transform

    ds = ImageFolderDataset(root, "val", eval_transform(SIZE))
    return torch.stack([ds[i][0] for i in range(len(ds))])


@torch.no_grad()
def val_mse(model, x, mode="full") -> float:
    model.eval()
    return torch.mean((model(x, mode=mode)[0] - x) ** 2).item()


def random_refnet_perceptual():
    """The domain perceptual loss on an untrained reference network (random conv features are a
    usable perceptual distance, and nothing has to be trained for the test)."""
    from iar2.perceptual import build_perceptual
    from iar2.refnet import RefNet, RefNetConfig

    torch.manual_seed(123)
    net = RefNet(RefNetConfig(num_classes=10, input_size=SIZE, widths=(8, 16), norm_groups=4))
    return build_perceptual("domain", net)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- learning

def test_reconstruction_error_falls(tiny_data, tmp_path):
    cfg = make_cfg(tiny_data, loss={"disc_start": 180, "disc_weight": 0.1},
                   train={"steps": 200, "log_every": 50, "ckpt_every": 100})
    x = val_images(tiny_data)
    before = val_mse(VQTrainer(cfg, DistInfo()).model, x)  # the same seeded initial weights
    out = train(cfg, tmp_path / "run")

    from iar2.tokenizer.vq_model import load_vq

    model = load_vq(out["weights"])
    after = val_mse(model, x)
    assert after < 0.35 * before, (before, after)

    meta = json.loads((tmp_path / "run" / "vq.json").read_text())
    assert meta["step"] == 200 and meta["model_config"]["codebook_size"] == 64
    assert meta["train_config"]["train"]["stage"] == "single" and len(meta["config_hash"]) == 12
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200]
    # the GAN terms appear once step >= disc_start, and the discriminator trains then
    assert rows[2]["gan"] == "" and rows[3]["gan"] != "" and float(rows[3]["disc"]) > 0
    assert all(0 < float(r["usage_single"]) <= 1 and 1 <= float(r["perplexity_single"]) <= 64 for r in rows)
    assert float(rows[-1]["l2"]) < float(rows[0]["l2"])
    ck = [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("step_*"))]
    assert ck == ["step_0000100", "step_0000200"]  # keep_last 2


@pytest.fixture
def one_thread():
    """This run's outcome depends on the last bits of float sums (measured: the decoded full/semantic MSE ratio was
    0.89 with one intra-op thread and 0.99 with two, same seeds), so pin the thread count for the test instead of
    trusting whatever the tests before it left behind; the global RNG does not matter (the trainer reseeds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dual_codebook_beats_its_semantic_codebook(tiny_data, tmp_path, one_thread):
    """Stage 1 (Eq. 7: perceptual + commitment) then stage 2 (Eq. 9 with interleaved Eq. 7 steps): the detail code
    quantises the residual the semantic code leaves (Eq. 6), so semantic + detail codes are much closer to the
    latent than the semantic code alone, and the decoded images are no worse."""
    perc = random_refnet_perceptual()
    loss = {"perceptual": "domain", "domain_net": "unused: the module is passed in"}
    s1 = make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss=loss,
                  train={"stage": "stage1", "steps": 60, "lr": 3e-4, "log_every": 30, "ckpt_every": 60})
    train(s1, tmp_path / "s1", perceptual=perc)
    s2 = make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss=loss,
                  train={"stage": "stage2", "steps": 120, "lr": 3e-4, "log_every": 60, "ckpt_every": 120,
                         "init_from": str(tmp_path / "s1")})
    out = train(s2, tmp_path / "s2", perceptual=perc)

    from iar2.tokenizer.vq_model import load_vq

    model, x = load_vq(out["weights"]), val_images(tiny_data)
    with torch.no_grad():
        # latent quantisation error, the quantity Eq. 6 lowers: far from the threshold (measured ratio 0.38)
        h = model.quant_conv(model.encoder(x))
        z = torch.nn.functional.normalize(h, dim=1)
        err = {m: ((model.quantize(h, mode=m).z_q - z) ** 2).mean().item() for m in ("full", "semantic")}
    assert err["full"] < 0.7 * err["semantic"], err
    # decoded: not clearly worse (a broken full path, e.g. detail codes added twice, is); the measured ratios 0.89
    # and 0.99 under different rounding make any margin below 1 a coin toss at this training length
    full, sem = val_mse(model, x, "full"), val_mse(model, x, "semantic")
    assert full < 1.1 * sem, (full, sem)
    rows = read_csv(tmp_path / "s2" / "metrics.csv")
    # joint and semantic-only steps are logged apart; both codebooks are in use
    assert {"total", "l2", "sem_total", "sem_perceptual", "usage_semantic", "usage_detail"} <= set(rows[-1])
    assert "perceptual" not in rows[-1]  # Eq. 9 has no perceptual term by default


# ----------------------------------------------------------------------------- stage-2 steps

@pytest.fixture(scope="module")
def stage1_weights(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    cfg = make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss={"semantic_l2_weight": 1.0},
                   train={"stage": "stage1", "steps": 3, "log_every": 3, "ckpt_every": 3})
    return train(cfg, d)["weights"]


def stage2_cfg(root, init, **train_over):
    return make_cfg(root, model={"quantizer": "semantic_detail"},
                    loss={"semantic_l2_weight": 1.0, "disc_start": 0},
                    train={"stage": "stage2", "init_from": str(init), **train_over})


def test_stage2_starts_from_stage1_except_detail_codebook(tiny_data, stage1_weights):
    # another seed than stage 1, so the fresh detail codebook differs from stage 1's (untrained) one
    trainer = VQTrainer(stage2_cfg(tiny_data, stage1_weights, seed=1), DistInfo())
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.init_from_stage1(stage1_weights)
    s1, now = load_weights(stage1_weights), trainer.model.state_dict()
    detail = "quantize.detail_codebook.weight"
    assert torch.equal(now[detail], fresh[detail]) and not torch.equal(now[detail], s1[detail])
    for k in now:
        if k != detail:
            assert torch.equal(now[k], s1[k]), k


def test_stage2_schedule_and_semantic_only_updates(tiny_data, stage1_weights):
    trainer = VQTrainer(stage2_cfg(tiny_data, stage1_weights), DistInfo())
    trainer.init_from_stage1(stage1_weights)
    assert [trainer.step_kind(s) for s in range(6)] == ["joint", "joint", "semantic"] * 2
    assert set(trainer.optimizers) == {"main", "semantic", "detail", "disc"}
    x = random_images(4, SIZE, seed=0)
    sem_key = "quantize.semantic_codebook.weight"

    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    disc_before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    trainer.train_step(2, [x])  # the Eq. 7 step
    after = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {sem_key}
    assert all(torch.equal(v, disc_before[k]) for k, v in trainer.disc.state_dict().items())  # no GAN in Eq. 7
    assert not trainer.optimizers["main"].state and not trainer.optimizers["detail"].state

    trainer.train_step(3, [x])  # a joint step moves everything, and the discriminator
    after2 = trainer.model.state_dict()
    for k in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.detail_codebook.weight", sem_key):
        assert not torch.equal(after2[k], after[k]), k
    assert any(not torch.equal(v, disc_before[k]) for k, v in trainer.disc.state_dict().items())


def test_stage1_leaves_detail_codebook_alone(tiny_data):
    cfg = make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss={"semantic_l2_weight": 1.0},
                   train={"stage": "stage1"})
    trainer = VQTrainer(cfg, DistInfo())
    assert set(trainer.optimizers) == {"main"} and trainer.disc is None  # Eq. 7 has no GAN by default
    detail = trainer.model.quantize.detail_codebook.weight
    assert all(p is not detail for p in trainer.optimizers["main"].param_groups[0]["params"])
    d0, s0 = detail.clone(), trainer.model.quantize.semantic_codebook.weight.clone()
    x = random_images(4, SIZE, seed=1)
    trainer.train_step(0, [x])
    assert torch.equal(detail, d0)
    assert not torch.equal(trainer.model.quantize.semantic_codebook.weight, s0)


# ----------------------------------------------------------------------------- resumption

def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", ["single_gan", "stage2"])
def test_killed_and_resumed_run_is_bit_identical(tiny_data, tmp_path, stage1_weights, variant):
    if variant == "single_gan":
        cfg = make_cfg(tiny_data, loss={"disc_start": 2},
                       train={"steps": 6, "log_every": 1, "ckpt_every": 2})
    else:  # three optimisers, semantic-only steps, GAN
        cfg = stage2_cfg(tiny_data, stage1_weights, steps=6, log_every=1, ckpt_every=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, a)

    train(cfg, b, stop_after=3)  # checkpoints at 2 and 3
    assert not (b / "vq.safetensors").exists()
    # simulate a kill after step 3 was logged but before its checkpoint was complete
    ck3 = b / "checkpoints" / "step_0000003"
    for f in ck3.iterdir():
        f.unlink()
    ck3.rmdir()
    atomic_write_text(b / "checkpoints" / "latest", "step_0000002\n")
    assert latest_checkpoint(b).name == "step_0000002"
    train(cfg, b, resume="auto")

    _assert_same_tensors(load_weights(a / "vq.safetensors"), load_weights(b / "vq.safetensors"))
    for f in ("model", "disc", "optim"):
        _assert_same_tensors(load_weights(a / "checkpoints/step_0000006" / f"{f}.safetensors"),
                             load_weights(b / "checkpoints/step_0000006" / f"{f}.safetensors"))
    ra, rb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert [r["step"] for r in rb] == [str(s) for s in range(1, 7)]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "steps_per_s"} == {k: v for k, v in y.items() if k != "steps_per_s"}


def test_resume_refuses_a_changed_config(tiny_data, tmp_path):
    cfg = make_cfg(tiny_data, train={"steps": 2, "ckpt_every": 2})
    train(cfg, tmp_path / "r")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg, tmp_path / "r")
    longer = make_cfg(tiny_data, train={"steps": 3, "ckpt_every": 2})
    assert train(longer, tmp_path / "r", resume="auto")["step"] == 3  # more steps: allowed
    other = make_cfg(tiny_data, train={"steps": 4, "ckpt_every": 2, "lr": 5e-4})
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000002"
    with pytest.raises(ConfigError, match="train.lr"):  # an explicit checkpoint of another config: refused
        train(other, tmp_path / "r", resume=str(ckpt))
    # `auto` (what the pipeline passes when it reruns a job whose config changed): a new run, old one set aside
    assert train(other, tmp_path / "r", resume="auto")["step"] == 4
    assert (tmp_path / "r" / "checkpoints.stale" / "step_0000002").is_dir()


def test_non_finite_loss_stops_naming_the_step(tiny_data, tmp_path):
    class NaNAtCall(torch.nn.Module):
        """A perceptual stand-in that turns non-finite on its 4th call (step 4)."""

        calls = 0

        def forward(self, x, y):
            NaNAtCall.calls += 1
            d = (x - y).pow(2).mean(dim=(1, 2, 3))
            return d * float("nan") if NaNAtCall.calls == 4 else d

    cfg = make_cfg(tiny_data, loss={"perceptual": "domain", "domain_net": "x"},
                   train={"steps": 6, "ckpt_every": 2})
    with pytest.raises(NonFiniteError, match=r"step 4\b.*last good checkpoint: .*step_0000002"):
        train(cfg, tmp_path / "n", perceptual=NaNAtCall())
    assert latest_checkpoint(tmp_path / "n").name == "step_0000002"
    assert not (tmp_path / "n" / "vq.safetensors").exists()


# ----------------------------------------------------------------------------- configuration

def test_config_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.stage.*needs a dual model"):
        make_cfg(tiny_data, train={"stage": "stage1"})
    with pytest.raises(ConfigError, match="train.stage"):
        make_cfg(tiny_data, model={"quantizer": "semantic_detail"})  # stage single on the associated codebook
    with pytest.raises(ConfigError, match="train.stage.*allowed values"):
        make_cfg(tiny_data, train={"stage": "stage3"})
    with pytest.raises(ConfigError, match="train.batch_size.*grad_accum"):
        make_cfg(tiny_data, train={"batch_size": 6, "grad_accum": 4})
    with pytest.raises(ConfigError, match="train.init_from"):
        train(make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss={"semantic_l2_weight": 1.0},
                       train={"stage": "stage2"}), tmp_path / "x")
    with pytest.raises(ConfigError, match="loss.perceptual"):  # Eq. 7 with no reconstruction term at all
        train(make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, train={"stage": "stage1"}), tmp_path / "y")
    with pytest.raises(ConfigError, match="loss.disc_layers"):  # 16 px leaves no logit after 3 halvings
        train(make_cfg(tiny_data, loss={"disc_layers": 3}), tmp_path / "z")
    with pytest.raises(FileNotFoundError, match="stage-1 weights not found"):
        train(make_cfg(tiny_data, model={"quantizer": "semantic_detail"}, loss={"semantic_l2_weight": 1.0},
                       train={"stage": "stage2", "init_from": str(tmp_path / "missing")}), tmp_path / "w")
    # the unassociated dual baseline trains with the single-stage recipe
    assert make_cfg(tiny_data, model={"quantizer": "unassociated_dual"}).train.stage == "single"
    assert config_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c"]


def test_cli_train_and_bench(tiny_data, tmp_path, capsys):
    from iar2.cli import main

    rc = main(["vq", "train", "--out", str(tmp_path / "cli"), "--set", f"data.root={tiny_data}",
               "data.image_size=16", "train.steps=2", "train.batch_size=4", "train.device=cpu",
               "model.quantizer=unassociated_dual"])
    assert rc == 0
    meta = json.loads((tmp_path / "cli" / "vq.json").read_text())
    assert meta["model_config"]["quantizer"] == "unassociated_dual" and meta["step"] == 2
    assert main(["vq", "train", "--out", str(tmp_path / "bad"), "--set", "train.stage=stage9"]) == 2

    assert main(["bench", "tokenizer", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--device", "cpu"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny")]
    assert [ln[1] for ln in lines] == ["single", "unassociated_dual", "stage1", "stage2"]
    assert float(lines[0][-1]) == 1.0 and all(float(ln[3]) > 0 for ln in lines)
