"""`iar2 bench sample|train`: interleaved repeats, min/median, the weights-read bound, JSON output; the dtype
choice for sampling on CPUs with and without native bf16."""
import argparse
import itertools
import json
import warnings

import pytest
import torch
import torch.nn as nn

from iar2.ar.generate import cpu_has_native_bf16, sampling_autocast
from iar2.bench import sample as bench_sample, train as bench_train
from iar2.bench.bound import linear_uses, row_factors, weight_bytes
from iar2.bench.timing import interleaved, ratio, stats
from test_ar_model import tiny


def test_interleaved_rounds_rotate_the_order_and_cap_slow_cases():
    calls = []
    cases = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    ticks = itertools.count()  # a fake clock: every reading one tick later, so each call lasts one tick
    times = interleaved(cases, repeats=3, device=torch.device("cpu"), warmup=1, limit={"c": 1},
                        clock=lambda: float(next(ticks)))
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    # rounds start at a, b, c in turn; c (capped at one round) runs only in the first
    assert calls[3:] == ["a", "b", "c", "b", "a", "a", "b"]
    assert [len(times[n]) for n in "abc"] == [3, 3, 1] and all(t == 1.0 for v in times.values() for t in v)


def test_stats_and_ratios_are_per_statistic():
    a, b = stats([3.0, 1.0, 2.0], scale=10), stats([2.0, 4.0, 1.0])
    assert a == {"min": 10.0, "median": 20.0, "n": 3}
    assert ratio(a, b) == {"min": 10.0, "median": 10.0}


def test_the_bound_counts_the_iar2_head_twice_and_everything_else_once():
    model = tiny("fused_hierarchical")
    uses = {name: n for name, _, n in linear_uses(model)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(uses) == set(linears)
    assert all(uses[n] == (2 if n.startswith("head.blocks.") else 1) for n in linears)
    expected = sum(m.weight.numel() * 4 * uses[n] for n, m in model.named_modules() if isinstance(m, nn.Linear))
    assert weight_bytes(model) == expected
    single = {name: n for name, _, n in linear_uses(tiny("single"))}
    assert single["output"] == 1 and all(v == 1 for v in single.values())


def test_the_actual_shapes_carry_the_semantic_slots_and_the_gathered_neighbours():
    model = tiny("fused_hierarchical")
    assert row_factors(model, "head.blocks.0.attention.wqkv", 2) == [2, 1]  # [c, h], then the detail slot
    assert row_factors(model, "head.context.mlp1.0", 1) == [12]
    assert row_factors(model, "backbone.layers.0.feed_forward.w1", 1) == [1]
    assert row_factors(tiny("fused_hierarchical", local_context="none"), "head.blocks.0.attention.wo", 2) == [1, 1]


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_bench_arguments(p)
    return p.parse_args(argv)


def test_bench_sample_reports_ms_per_step_bound_ratio_and_kv_speedup(tmp_path, capsys):
    out = tmp_path / "sample.json"
    args = _args(bench_sample, ["--size", "custom", "--dim", "32", "--n-layer", "1", "--n-head", "2",
                                "--head-layers", "1", "--grid", "2", "--batch-size", "1", "--repeats", "2",
                                "--threads", "1", "--json", str(out)])
    assert bench_sample.run_bench(args) == 0
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and res["settings"]["rows"] == 2 and res["commit"]
    for fam in ("iar2", "llamagen"):
        r = res["results"][fam]
        assert r["ms_per_step"]["n"] == 2 and r["bound_ms"]["n"] == 2 and r["uncached_ms_per_step"]["n"] == 1
        assert r["ratio_to_bound"]["min"] == pytest.approx(r["ms_per_step"]["min"] / r["bound_ms"]["min"])
        assert r["ratio_to_gemm"]["median"] == pytest.approx(r["ms_per_step"]["median"] / r["gemm_ms"]["median"])
        assert r["kv_speedup"]["median"] == pytest.approx(r["uncached_ms_per_step"]["median"]
                                                          / r["ms_per_step"]["median"])
    assert "ratio min" in capsys.readouterr().out


def test_kv_estimate_integrates_the_full_forwards_extra_cost_over_every_backbone_step():
    # full forward 1, 3, 5 ms at positions 0, 2, 4 (linear: 1..5 at 0..4), cached step 1 ms; decode 10 ms
    times = {"m/full@0": [1.0, 2.0], "m/full@2": [3.0, 9.0], "m/full@4": [5.0, 6.0],
             "m/cached@0": [1.0, 1.0], "m/cached@2": [1.0, 1.0], "m/cached@4": [1.0, 1.0]}
    est = bench_sample.kv_estimate(times, "m", [0, 2, 4], 5, [10.0, 30.0])
    assert est["decode"]["min"] == pytest.approx((10 + (0 + 1 + 2 + 3 + 4)) / 10)  # min of each case
    assert est["backbone"]["min"] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert est["decode"]["median"] == pytest.approx((20 + (0.5 + 2.75 + 5 + 4.75 + 4.5)) / 20)


def test_bench_sample_estimates_the_kv_speedup_from_sampled_positions(tmp_path):
    out = tmp_path / "sample.json"
    args = _args(bench_sample, ["--size", "custom", "--dim", "32", "--n-layer", "1", "--n-head", "2",
                                "--head-layers", "1", "--grid", "3", "--batch-size", "1", "--repeats", "2",
                                "--threads", "1", "--kv-repeats", "0", "--kv-positions", "3", "--json", str(out)])
    assert bench_sample.run_bench(args) == 0
    for fam in ("iar2", "llamagen"):
        e = json.loads(out.read_text())["results"][fam]["kv_speedup_estimate"]
        assert e["positions"] == [0, 4, 8]  # 9 backbone steps: the first, the middle and the last
        assert e["decode"]["min"] > 0 and e["backbone"]["median"] > 0


def test_bench_train_reports_interleaved_min_and_median(tmp_path):
    out = tmp_path / "train.json"
    args = _args(bench_train, ["--dim", "32", "--n-layer", "1", "--n-head", "2", "--head-layers", "1",
                               "--grid", "2", "--batch-size", "2", "--repeats", "2", "--families", "llamagen,iar2",
                               "--dtype", "bf16", "--json", str(out)])
    assert bench_train.run_bench(args) == 0
    res = json.loads(out.read_text())["results"]
    assert res["llamagen"]["ms_per_step"]["n"] == 2
    assert res["iar2"]["time_vs_llamagen"]["min"] == pytest.approx(
        res["iar2"]["ms_per_step"]["min"] / res["llamagen"]["ms_per_step"]["min"])


AVX2 = "processor : 0\nflags : fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_tile\n"
ARM_BF16 = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(AVX512_BF16) and cpu_has_native_bf16(ARM_BF16)


def test_sampling_warns_and_runs_fp32_when_bf16_is_asked_of_a_cpu_without_it():
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="without native bf16"):
        ctx = sampling_autocast("bf16", cpu, cpuinfo=AVX2)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where bf16 is native, nor for fp32
        with sampling_autocast("bf16", cpu, cpuinfo=AVX512_BF16):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with sampling_autocast("fp32", cpu, cpuinfo=AVX2):
            assert not torch.is_autocast_enabled("cpu")
