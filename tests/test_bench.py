"""qvlm bench: the timer, the FLOP formula, fair references, and the report's shape. No timing asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlm.bench import flops as FL
from qvlm.bench.timing import Timing, time_interleaved


class FakeClock:
    """Time stands still unless a variant advances it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_interleaved_alternates_variants_and_their_order_and_takes_the_median():
    clock, order = FakeClock(), []
    costs = {"a": iter([100.0, 1.0, 3.0, 2.0]), "b": iter([50.0, 10.0, 30.0, 20.0])}

    def variant(name):
        def run():
            order.append(name)
            clock.now += next(costs[name])
        return run

    timings = time_interleaved({"a": variant("a"), "b": variant("b")}, repeats=3, warmup=1, clock=clock)
    assert order == ["a", "b", "b", "a"] * 2  # interleaved, reversed every other round, warm-up round included
    assert timings["a"].seconds == [1.0, 3.0, 2.0] and timings["a"].median == 2.0  # warm-up dropped
    assert timings["b"].median == 20.0
    assert Timing([1.0, 3.0, 2.0]).spread == 1.0
    with pytest.raises(ValueError):
        time_interleaved({"a": variant("a")}, repeats=0)


def test_median_interval_order_statistics_and_coverage():
    from qvlm.bench.timing import median_interval

    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)  # too few for 90%: the lowest and highest
    low, high, coverage = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (low, high) == (1.0, 5.0) and coverage == pytest.approx(1 - 2 / 32)
    low, high, coverage = median_interval([float(x) for x in range(9, 0, -1)])
    assert (low, high) == (2.0, 8.0) and coverage == pytest.approx(1 - 2 * 10 / 512)  # k = 2: 96%
    low, high, coverage = median_interval([float(x) for x in range(20)])
    assert (low, high) == (5.0, 14.0) and coverage >= 0.9  # k = 6 of 20
    assert median_interval([float(x) for x in range(20)], confidence=0.5)[2] >= 0.5
    assert median_interval([2.0]) == (2.0, 2.0, 0.0)


def test_ratio_of_medians_with_an_interval_over_paired_rounds():
    from qvlm.bench.timing import Ratio

    ref, ours = Timing([2.0, 9.0, 3.0, 4.0, 3.0]), Timing([1.0, 3.0, 2.0, 4.0, 1.0])
    r = Ratio.of(ref, ours)  # medians 3.0 / 2.0; per round 2, 3, 1.5, 1, 3
    assert r == 1.5 and isinstance(r, float) and round(r, 3) == 1.5
    assert (r.low, r.high, r.rounds) == (1.0, 3.0, 5) and r.coverage == pytest.approx(0.9375)
    with pytest.raises(ValueError, match="same rounds"):
        Ratio.of(ref, Timing([1.0]))


def test_report_table_shows_ratio_intervals_and_goal_verdicts():
    from qvlm.bench import finish
    from qvlm.bench.table import goal_verdict, table
    from qvlm.bench.timing import Ratio

    class NoRows:
        notes, rows = [], []

    report = {"device": "CPU", "threads": 2, "precision": "fp32", "quick": True, "repeats": 3, "warmup": 0,
              "load_avg_start": [],
              "ratios": {"qformer_vs_hf_blip2": Ratio(1.25, 0.9, 1.3, 5, 0.9375), "compile_stage1": 0.8}}
    out = finish(report, NoRows(), start=0.0)
    assert out["ratios"] == {"qformer_vs_hf_blip2": 1.25, "compile_stage1": 0.8, "cached_vs_pixels_stage1": None,
                             "kv_cache_generation": None}
    assert out["ratio_intervals"] == {"qformer_vs_hf_blip2": {"low": 0.9, "high": 1.3, "rounds": 5, "coverage": 0.938}}
    assert isinstance(report["ratios"]["qformer_vs_hf_blip2"], Ratio) and "rows" not in report  # a copy
    text = table(out)
    assert "0.90-1.30 (94%, n=5)" in text and "goal >= 1.2: met by the median, not by its interval" in text
    assert f"{'kv_cache_generation':<34}      -  (not measured: see notes)" in text
    assert goal_verdict(1.25, 1.2, {"low": 1.21, "high": 1.3, "rounds": 5}) == "met"
    assert goal_verdict(1.25, 1.2, None) == "met"
    assert goal_verdict(1.1, 1.2, {"low": 1.0, "high": 1.3, "rounds": 5}) == "NOT met"


def test_flops_multipliers_and_mfu_on_hand_numbers():
    trained = FL.MatmulGroup("w", params=10, tokens=3, trained=True, input_grad=True)
    through = FL.MatmulGroup("frozen, backprop", params=10, tokens=3, trained=False, input_grad=True)
    forward = FL.MatmulGroup("frozen, forward only", params=10, tokens=3, trained=False, input_grad=False)
    assert (trained.flops, through.flops, forward.flops) == (180, 120, 60)  # 6x, 4x, 2x params x tokens
    assert FL.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert FL.mfu(1e12, 0.5, None) is None
    assert FL.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert FL.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert FL.peak_bf16_flops("NVIDIA H200") == 989e12
    assert FL.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert FL.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


def test_qformer_query_path_groups_by_hand():
    from transformers import BertConfig

    from qvlm.models.qformer import QFormer

    qf = QFormer(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 vision_width=24, num_queries=4)  # cross-attention in layer 0 only
    query, kv = FL.qformer_groups(qf, images=3, image_tokens=7)
    # self-attention q/k/v/dense and the query FFN of both layers, cross-attention's query and output
    assert query.params == 2 * 4 * 32 * 32 + 2 * 2 * 32 * 64 + 2 * 32 * 32 and query.tokens == 3 * 4
    assert kv.params == 2 * 24 * 32 and kv.tokens == 3 * 7
    assert kv.flops == 4 * kv.params * 21  # trained weights, no gradient into frozen features
    assert [g.flops for g in FL.qformer_groups(qf, 3, 7, trained=False)] == [2 * query.params * 12, 2 * kv.params * 21]


def test_hf_reference_has_our_parameter_count_and_runs():
    from qvlm.bench.qformer_ref import build_pair, comparable_params, fwd_bwd, query_outputs

    modules = build_pair(hidden=32, layers=4, heads=2, intermediate=64, vision_width=24, queries=4)
    assert set(modules) == {"ours", "hf"}
    assert comparable_params(modules["ours"]) == comparable_params(modules["hf"])
    assert modules["hf"].attn_implementation == "sdpa"
    image = torch.randn(2, 5, 24)
    for m in modules.values():
        assert query_outputs(m, image).shape == (2, 4, 32)
        fwd_bwd(m, image, torch.randn(4, 32), torch.autocast("cpu", enabled=False))


def test_smoke_bench_report_has_the_ratios_and_rows(capsys):
    """The whole bench at tiny shapes through the CLI: one JSON object with positive ratios."""
    from qvlm.bench import PLANS
    from qvlm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and steadier on a shared machine
    try:
        assert main(["bench", "--plan", "smoke", "--json", "--device", "cpu", "--precision", "fp32"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["notes"] == [n for n in report["notes"] if "failed" not in n], report["notes"]
    headline = {"qformer_vs_hf_blip2", "cached_vs_pixels_stage1", "kv_cache_generation"}
    measured = headline | {"kv_cache_generation_batched", "checkpointing_stage1", "checkpointing_stage2"}
    assert set(report["ratios"]) == measured  # smoke: no torch.compile rows
    for key in measured:
        assert isinstance(report["ratios"][key], float) and report["ratios"][key] > 0, key
        interval = report["ratio_intervals"][key]  # the smoke plan times one round: the interval is the ratio itself
        assert interval["rounds"] == 1 and interval["coverage"] == 0
        assert interval["low"] == interval["high"] == pytest.approx(report["ratios"][key], abs=2e-3)
    for r in report["rows"]:
        assert r["ms"] > 0 and r["batch"] >= 0 and r["precision"] == "fp32"
    names = {}
    for r in report["rows"]:
        names.setdefault(r["group"], []).append(r["name"])
    assert sorted(names) == ["Q-Former fwd+bwd (query path + image cross-attention)", "caption generation",
                             "stage-1 train step", "stage-2 train step"]
    qformer = [r for r in report["rows"] if r["group"].startswith("Q-Former")]
    assert [r["batch"] for r in qformer] == [PLANS["smoke"].qformer_batch] * 2
    checkpointing = ["gradient checkpointing off", "gradient checkpointing on"]
    assert names["stage-1 train step"] == ["from cached features", "from image files (decode + frozen ViT)",
                                           *checkpointing]
    assert names["stage-2 train step"] == ["from cached features", *checkpointing]
    stage2 = report["rows"][[r["group"] for r in report["rows"]].index("stage-2 train step")]
    assert stage2["model_tflop_per_step"] > 0 and stage2["tokens_per_s"] > 0 and "peak_mem_mb" in stage2
    assert all("peak_mem_mb" in r and r["spread"] >= 0 for r in report["rows"])


def test_generation_bench_with_and_without_the_kv_cache(tmp_path):
    """Latency and batched rows with and without the KV cache, the ratios no cache / cache."""
    from qvlm.bench.generation import bench_generation
    from qvlm.bench.harness import Bench
    from qvlm.bench.shapes import SHAPES

    bench = Bench(torch.device("cpu"), "fp32", repeats=2, warmup=0, work=tmp_path)
    ratios = bench_generation(bench, SHAPES["smoke"], batch_size=2, new_tokens=3)
    assert set(ratios) == {"kv_cache_generation", "kv_cache_generation_batched"}
    assert all(r > 0 and r.rounds == 2 for r in ratios.values())
    assert [(r["name"], r["batch"]) for r in bench.rows] == [
        ("latency, 1 image, KV cache", 1), ("latency, 1 image, no cache", 1),
        ("batched, 2 images, KV cache", 2), ("batched, 2 images, no cache", 2)]
    assert all(r["images_per_s"] > 0 and r["tokens_per_s"] > 0 and "peak_mem_mb" in r for r in bench.rows)
    assert bench.notes == []


def test_bench_sections_in_order_and_json_out_written(tmp_path, capsys):
    """--sections runs only those, in that order; --json-out holds the final report."""
    from qvlm.cli import main

    out = tmp_path / "report.json"
    assert main(["bench", "--plan", "smoke", "--device", "cpu", "--precision", "fp32", "--sections",
                 "generation,qformer", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sections"] == ["generation", "qformer"] and "partial" not in report
    groups = [r["group"] for r in report["rows"]]
    assert groups[0] == "caption generation" and groups[-1].startswith("Q-Former")
    assert not any(g.startswith("stage-") for g in groups)
    assert report["ratios"]["qformer_vs_hf_blip2"] > 0 and report["ratios"]["cached_vs_pixels_stage1"] is None
    assert "caption generation" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", "--batch-search", "-1"], ["bench", "--precision", "fp16"],
                                  ["bench", "--sections", "stage3"], ["bench", "--sections", ","],
                                  ["bench", "--json-out", "/no/such/dir/report.json"], ["bench", "--json-out", "/"]])
def test_bench_bad_usage_exits_2(argv):
    from qvlm.cli import main

    assert main(argv) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_cuda_exits_2():
    from qvlm.cli import main

    assert main(["bench", "--device", "cuda"]) == 2


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> args...`` with qvlm importable from the source tree; output captured."""
    src = BENCHMARKS.parent / "src"
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src)})


def test_gpu_script_parses_and_the_profile_script_runs():
    """gpu.sh is plain bash (a syntax error would cost a GPU session); profile_step.py at smoke shapes."""
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu.sh")]).returncode == 0
    out = run_benchmark_script("profile_step.py", "--stage", "1", "--shapes", "smoke", "--batch", "2",
                               "--precision", "fp32", "--rows", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("== stage 1, smoke shapes, batch 2, fp32: ") and "top operators" in out.stdout


def test_profile_script_counts_the_sync_debug_warnings_by_site(monkeypatch):
    """On a GPU profile_step.py counts how often the step made the host wait (PyTorch's sync debug
    mode warns at each): by site, the mode reset afterwards; nothing on a CPU."""
    import importlib.util
    import warnings

    spec = importlib.util.spec_from_file_location("profile_step", BENCHMARKS / "profile_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation\nstack ...", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)

    syncs = script.host_syncs(step, torch.device("cuda"))
    assert modes == ["warn", "default"]
    [(site, count)] = syncs.items()
    assert count == 3 and site.startswith("test_bench.py:") and site.endswith("called a synchronizing CUDA operation")
    assert script.host_syncs(step, torch.device("cpu")) is None


def test_qformer_headline_batch_is_the_recipes_training_batch():
    """The Q-Former comparison runs at the real shapes' recipe batch, not a batch picked for the ratio."""
    from qvlm.bench import PLANS, RECIPE_BATCH
    from qvlm.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "blip2-smollm2.yaml"
    assert load_config(recipe).train.batch_size == RECIPE_BATCH
    assert PLANS["full"].qformer_batch == PLANS["quick"].qformer_batch == RECIPE_BATCH
    assert PLANS["full"].shapes == PLANS["quick"].shapes == "real"
