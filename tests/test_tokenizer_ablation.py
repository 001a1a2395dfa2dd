"""workflow/scripts/tokenizer_ablation.py: the variant retrains the DAG's tokenizer configs changing only what its
flags name (steps, batch size, estimator), stage 2 starts from the variant's own stage 1, and the DAG's own
tokenizers are refused as a variant."""
import json
from pathlib import Path

import pytest

from helpers import load_script

def write_configs(results: Path):
    cfgs = results / "configs" / "tokenizer"
    cfgs.mkdir(parents=True)
    for name, steps in (("sd-256-4096-stage1", 240), ("sd-256-4096-stage2", 480), ("vq-16384-single", 480)):
        (cfgs / f"{name}.yaml").write_text(json.dumps({"train": {"steps": steps, "batch_size": 16}}))


@pytest.mark.parametrize("steps_factor,batch_factor,expect", [(2.0, 1.0, ((480, 16), (960, 16))),
                                                              (1.0, 0.5, ((240, 8), (480, 8)))])
def test_retrain_changes_only_steps_and_batch_and_chains_the_variants_own_stages(tmp_path, monkeypatch,
                                                                                 steps_factor, batch_factor, expect):
    mod = load_script("tokenizer_ablation")
    write_configs(tmp_path)
    calls = []

    def fake_run(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "vq.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(mod, "_run", fake_run)
    out = tmp_path / "variant"
    weights = mod._retrain(tmp_path, "sd-256-4096", out, steps_factor, batch_factor)
    assert weights == out / "vq.safetensors"
    assert len(calls) == 2
    for argv, (steps, batch), stage in zip(calls, expect, ("stage1", "stage2")):
        assert argv[:3] == ["vq", "train", "--config"] and argv[3].endswith(f"sd-256-4096-{stage}.yaml")
        assert f"train.steps={steps}" in argv and f"train.batch_size={batch}" in argv
    assert f"train.init_from={out / 'stage1' / 'vq.safetensors'}" in calls[1]  # not the DAG's stage 1
    # a finished variant is not trained again
    mod._retrain(tmp_path, "sd-256-4096", out, steps_factor, batch_factor)
    assert len(calls) == 2


def test_the_dags_own_tokenizers_are_not_a_variant(tmp_path, capsys):
    mod = load_script("tokenizer_ablation")
    (tmp_path / "default.yaml").write_text("data: {root: x}\n")
    with pytest.raises(SystemExit) as e:
        mod.main(["--results", str(tmp_path / "default"), "--scale-file", str(tmp_path / "default.yaml"),
                  "--estimator", "paper"])
    assert e.value.code == 2 and "DAG's own tokenizers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mod.main(["--results", str(tmp_path / "default"), "--scale-file", str(tmp_path / "default.yaml"),
                  "--batch-factor", "0"])
    assert e.value.code == 2


def test_variant_folders_are_keyed_by_the_flags_and_the_inputs(tmp_path):
    mod = load_script("tokenizer_ablation")
    write_configs(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "check.json").write_text("{}")
    (tmp_path / "refnet").mkdir()
    (tmp_path / "refnet" / "refnet.safetensors").write_bytes(b"net")
    scale = tmp_path / "default.yaml"
    scale.write_text("x: 1\n")
    a = mod._tok_dir(tmp_path, scale, "vq-16384", tmp_path / "out", "paper-x1-b0.5")
    b = mod._tok_dir(tmp_path, scale, "vq-16384", tmp_path / "out", "paper-x2")
    assert a != b and a.name.startswith("vq-16384-")
    (tmp_path / "configs" / "tokenizer" / "vq-16384-single.yaml").write_text(
        json.dumps({"train": {"steps": 240, "batch_size": 16}}))
    assert mod._tok_dir(tmp_path, scale, "vq-16384", tmp_path / "out", "paper-x1-b0.5") != a  # a changed config
