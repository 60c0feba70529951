"""``qvlm bench``: speed benchmarks with their references measured in the same run, on the same shapes.

Sections (each a module here): the Q-Former forward + backward against ``transformers``'
``Blip2QFormerModel`` (``qformer_ref``); the stage-1 step from cached features vs from image files,
fused vs LAVIS-style passes, padding, and the speed options (``stage1``); the stage-2 step
(``stage2``); caption generation with and without the KV cache (``generation``); and, asked for by
name, compiled decoding steps against the eager KV cache (``decode``). Model FLOPs and MFU
come from ``flops``, timing and memory from ``timing``, the table and JSON from ``report``.

``run_bench(quick=..., device=..., precision=...)`` returns the report dict; its ``ratios`` hold
``qformer_vs_hf_blip2``, ``cached_vs_pixels_stage1`` and ``kv_cache_generation`` (ours faster by).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qvlm.allocator import in_effect
from qvlm.bench.shapes import SHAPES, Shapes
from qvlm.bench.timing import Ratio

__all__ = ["run_bench", "PLANS"]
RECIPE_BATCH = 32  # train.batch_size of configs/blip2-smollm2.yaml, the real shapes' recipe (a test keeps them equal)
NOISY = 0.5  # a row whose (max - min) / median of timed rounds exceeds this is flagged in the notes


@dataclass(frozen=True)
class Plan:
    """How much to run: repeats, batch sizes per benchmark, which optional rows."""

    repeats: int  # timed rounds of the headline comparisons (after ``warmup`` untimed ones)
    warmup: int
    option_repeats: int  # timed rounds of the other rows (options, padding, generation)
    qformer_repeats: int  # timed rounds of the Q-Former rows: cheap, and more rounds narrow its ratio's interval
    qformer_batch: int  # the headline Q-Former comparison's batch (the real recipe's train.batch_size)
    stage1_batch: int  # real shapes (ViT-B/16)
    vitl_batch: int
    demo_stage1_batch: int
    stage2_batch: int
    demo_stage2_batch: int
    gen_batch: int
    gen_tokens: int
    gen_demo: bool  # also generate at demo shapes
    structure: bool  # fused vs LAVIS-style passes, dynamic padding vs pad-to-max
    options: bool  # checkpointing, AdamW variants, DataLoader workers
    compile: bool  # torch.compile on/off (minutes of compilation on CPU)
    qformer_small_batch: int = 0  # also ours vs Blip2QFormerModel (SDPA) at this batch (ratio suffix _b<N>); 0: not
    real: str = "real"  # shape names used for the real / ViT-L ("" = skip) / demo roles
    vitl: str = "vitl14"
    demo: str = "demo"


PLANS = {
    "quick": Plan(repeats=3, warmup=0, option_repeats=3, qformer_repeats=5, qformer_batch=RECIPE_BATCH, stage1_batch=2,
                  vitl_batch=2, demo_stage1_batch=8, stage2_batch=2, demo_stage2_batch=2, gen_batch=4,
                  gen_tokens=6, gen_demo=False, structure=False, options=False, compile=False, vitl=""),
    "full": Plan(repeats=5, warmup=1, option_repeats=3, qformer_repeats=9, qformer_batch=RECIPE_BATCH,
                 stage1_batch=8, vitl_batch=4, demo_stage1_batch=32, stage2_batch=8, demo_stage2_batch=8, gen_batch=8,
                 gen_tokens=16, gen_demo=True, structure=True, options=True, compile=True, qformer_small_batch=8),
    # configs/tiny.yaml shapes everywhere: the unit tests' plan (seconds)
    "smoke": Plan(repeats=1, warmup=0, option_repeats=1, qformer_repeats=1, qformer_batch=2, stage1_batch=2,
                  vitl_batch=2, demo_stage1_batch=2, stage2_batch=2, demo_stage2_batch=2, gen_batch=2,
                  gen_tokens=2, gen_demo=True, structure=True, options=True, compile=False, real="smoke",
                  vitl="smoke", demo="smoke"),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


SECTIONS = ("qformer", "stage1", "stage2", "generation", "decode")
DEFAULT_SECTIONS = SECTIONS[:4]  # "decode" compiles for minutes on a CPU: asked for by name


def check_sections(sections: tuple[str, ...]) -> None:
    """ValueError unless ``sections`` is a non-empty selection from ``SECTIONS``."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"unknown bench sections {unknown or list(sections)}; choose from {', '.join(SECTIONS)}")


def run_bench(quick: bool = False, device: str = "cpu", precision: str = "auto", plan: str | None = None,
              batch_search: int = 0, work_dir: str | None = None, progress: bool = True,
              sections: tuple[str, ...] = DEFAULT_SECTIONS, partial: Callable[[dict], None] | None = None) -> dict:
    """Run the ``sections`` in the order given and return the report (rows, ratios, findings, notes,
    run details); ``partial(report)`` gets the report so far after each section (so a run stopped
    by a time limit still leaves its finished sections)."""
    from qvlm.bench import flops as FL
    from qvlm.bench.harness import Bench

    check_sections(sections)
    name = plan or ("quick" if quick else "full")
    p = PLANS[name]
    dev = torch.device(device)
    start = time.perf_counter()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(dev),
              "device_type": dev.type, "threads": torch.get_num_threads(), "malloc": in_effect(),
              "quick": quick, "plan": name, "repeats": p.repeats, "warmup": p.warmup, "torch": torch.__version__,
              "load_avg_start": load_avg(), "ratios": {}, "findings": {}}
    peak = FL.peak_bf16_flops(report["device"]) if dev.type == "cuda" else None
    report["peak_bf16_flops"] = peak
    with tempfile.TemporaryDirectory(dir=work_dir) as work, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, once per model
        bench = Bench(dev, precision, p.repeats, p.warmup, Path(work), quick=quick)
        report["precision"] = bench.precision_label
        known = {
            "qformer": ("Q-Former vs transformers Blip2QFormerModel", lambda: section_qformer(bench, p, report)),
            "stage1": ("stage 1", lambda: section_stage1(bench, p, report, peak, batch_search)),
            "stage2": ("stage 2", lambda: section_stage2(bench, p, report, peak, batch_search)),
            "generation": ("generation", lambda: section_generation(bench, p, report)),
            "decode": ("compiled decoding", lambda: section_decode(bench, p, report)),
        }
        report["sections"] = list(sections)
        for key in sections:
            title, run = known[key]
            t0 = time.perf_counter()
            say(progress, f"bench: {title} ...")
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
                bench.notes.append(f"{title} failed: {type(exc).__name__}: {exc}")
                if os.environ.get("QVLM_DEBUG"):
                    traceback.print_exc()
            say(progress, f"bench: {title} done in {time.perf_counter() - t0:.0f} s")
            if partial is not None:
                partial(finish(report, bench, start, done=False))
        finish(report, bench, start, done=True)
    return report


def finish(report: dict, bench, start: float, done: bool) -> dict:
    """Fill in the report's rows, notes, ratios and wall time (a copy when the run is not ``done``)."""
    if not done:
        report = {**report, "ratios": dict(report["ratios"]), "partial": True}
    notes = list(bench.notes)
    noisy = [f"{r['name']} ({r['shapes'].split(' ')[0]}, ±{100 * r['spread']:.0f}%)" for r in bench.rows
             if r["spread"] > NOISY]
    if noisy:
        notes.append(f"rows whose timed rounds differ by more than {100 * NOISY:.0f}% of their median "
                     f"(other jobs stalled this process; ratios built on them are unreliable): " + "; ".join(noisy))
    report["rows"], report["notes"] = list(bench.rows), notes
    for key in ("qformer_vs_hf_blip2", "cached_vs_pixels_stage1", "kv_cache_generation"):
        report["ratios"].setdefault(key, None)
    report["ratio_intervals"] = {k: {"low": round(v.low, 3), "high": round(v.high, 3), "rounds": v.rounds,
                                  "coverage": round(v.coverage, 3)}
                              for k, v in report["ratios"].items() if isinstance(v, Ratio)}
    report["ratios"] = {k: (None if v is None else round(v, 3)) for k, v in report["ratios"].items()}
    report["load_avg_end"] = load_avg()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def shapes_of(p: Plan, role: str) -> Shapes:
    return SHAPES[getattr(p, role)]


# ---- sections -----------------------------------------------------------------------------------

GPU_QFORMER_BATCH = 256  # on a GPU the recipe's batch of 32 is bound by kernel launches; this one by the kernels


def section_qformer(bench, p: Plan, report: dict) -> None:
    """Ours against ``Blip2QFormerModel`` at the plan's batch, the real recipe's training batch (the
    headline ratios); the pair alone also at ``p.qformer_small_batch`` and, on a GPU, every variant at
    ``GPU_QFORMER_BATCH`` (ratios suffixed ``_b<batch>``)."""
    from qvlm.bench.qformer_ref import build_pair, comparable_params
    from qvlm.models.dropout import set_cheap_masks

    real = shapes_of(p, "real")
    if real.name == "smoke":
        dims = dict(hidden=32, layers=2, heads=2, intermediate=64, vision_width=32, queries=4)
        tokens = 17
    else:
        dims = dict(hidden=768, layers=12, heads=12, intermediate=3072, vision_width=768, queries=32)
        tokens = 197  # ViT-B/16 at 224 px
    modules = {k: m.to(bench.device) for k, m in build_pair(**dims).items()}
    if p.structure:  # the full run: also ours with self-attention's q/k/v as one GEMM (train.fused_qkv),
        modules["ours_fused_qkv"] = copy.deepcopy(modules["ours"])  # and ours with PyTorch's dropout masks
        modules["ours_fused_qkv"].fuse_qkv(True)
        modules["ours_torch_dropout"] = copy.deepcopy(modules["ours"])
        set_cheap_masks(modules["ours_torch_dropout"], False)
        if bench.device.type == "cpu" and bench.bf16:  # and ours with the math kernel's fp32 upcast
            modules["ours_upcast_math"] = modules["ours"]  # (the same weights, under attention_kernel.upcast_math)
    else:  # --quick: the headline pair alone, for more rounds in the same time
        del modules["hf_eager"]
    counts = {k: comparable_params(m) for k, m in modules.items()}
    pair = {k: modules[k] for k in ("ours", "hf_sdpa")}
    runs = [(p.qformer_batch, modules)]
    if p.qformer_small_batch:
        runs.append((p.qformer_small_batch, pair))
    if bench.device.type == "cuda" and real.name != "smoke":
        runs.append((GPU_QFORMER_BATCH, modules))
    for batch, variants in runs:
        suffix = "" if batch == p.qformer_batch else f"_b{batch}"
        with bench.rounds(p.qformer_repeats):
            timings = time_qformers(bench, variants, dims, tokens, batch, counts)
        qformer_ratios(timings, suffix, report["ratios"])
    report["findings"]["qformer_params_ours_vs_hf"] = f"{counts['ours']} vs {counts['hf_sdpa']}"
    del modules, pair


def qformer_ratios(timings: dict, suffix: str, ratios: dict) -> None:
    """The Q-Former ratios (ours faster by) of one batch's ``timings``, for the variants timed."""
    ours = timings["ours"]
    ratios[f"qformer_vs_hf_blip2{suffix}"] = Ratio.of(timings["hf_sdpa"], ours)
    if "hf_eager" in timings:
        ratios[f"qformer_vs_hf_blip2_eager{suffix}"] = Ratio.of(timings["hf_eager"], ours)
        ratios[f"hf_sdpa_vs_eager{suffix}"] = Ratio.of(timings["hf_eager"], timings["hf_sdpa"])
    if "ours_fused_qkv" in timings:
        ratios[f"fused_qkv_qformer{suffix}"] = Ratio.of(ours, timings["ours_fused_qkv"])
    if "ours_torch_dropout" in timings:
        ratios[f"cheap_dropout_qformer{suffix}"] = Ratio.of(timings["ours_torch_dropout"], ours)
    if "ours_upcast_math" in timings:
        ratios[f"bf16_math_attention_qformer{suffix}"] = Ratio.of(timings["ours_upcast_math"], ours)


def time_qformers(bench, modules: dict, dims: dict, tokens: int, batch: int, counts: dict) -> dict:
    """Interleaved forward + backward timings of the query paths in ``modules`` at ``batch``, and their rows."""
    from qvlm.bench.harness import row
    from qvlm.bench.qformer_ref import fwd_bwd
    from qvlm.models.attention_kernel import upcast_math

    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, tokens, dims["vision_width"], generator=g).to(bench.device)
    probe = torch.randn(dims["queries"], dims["hidden"], generator=g).to(bench.device)

    def variant(key: str, module: torch.nn.Module) -> Callable[[], None]:
        def call():
            with upcast_math() if key == "ours_upcast_math" else contextlib.nullcontext():
                fwd_bwd(module, image, probe, bench.autocast())
        return call

    variants = {k: variant(k, m) for k, m in modules.items()}
    timings = bench.time(variants)
    label = (f"{dims['layers']} layers, width {dims['hidden']}, {dims['heads']} heads, FFN {dims['intermediate']}, "
             f"cross-attn every 2, Dv {dims['vision_width']}")
    names = {"ours": "ours (qvlm QFormer, SDPA)", "hf_sdpa": "transformers Blip2QFormerModel, sdpa",
             "hf_eager": "transformers Blip2QFormerModel, eager (hand-rolled softmax)",
             "ours_fused_qkv": "ours, self-attention q/k/v as one GEMM (train.fused_qkv)",
             "ours_torch_dropout": "ours, PyTorch's dropout masks (bernoulli_) for the hidden dropouts",
             "ours_upcast_math": "ours, SDPA's math kernel upcasting bf16 attention to fp32 (PyTorch's default)"}
    for key, timing in timings.items():
        row(bench, "Q-Former fwd+bwd (query path + image cross-attention)", names[key], label, batch,
            f"Q={dims['queries']} N={tokens}", timing, note=f"{counts[key] / 1e6:.2f}M params compared")
    return timings


def section_stage1(bench, p: Plan, report: dict, peak, batch_search: int) -> None:
    from qvlm.bench import stage1 as S1
    from qvlm.bench.harness import SceneFiles, build_trainer, fixed_stage1_batch

    real, demo = shapes_of(p, "real"), shapes_of(p, "demo")
    r, found = report["ratios"], report["findings"]
    batch = p.stage1_batch
    if batch_search:
        batch = stage1_batch_search(bench, real, batch, batch_search)
    r["cached_vs_pixels_stage1"] = S1.cached_vs_pixels(bench, real, batch, peak)
    if p.vitl:
        attempt(bench, "ViT-L/14 cached vs pixels", lambda: r.__setitem__(
            "cached_vs_pixels_stage1_vitl14", S1.cached_vs_pixels(bench, shapes_of(p, "vitl"), p.vitl_batch, peak)))
    if p.structure:  # not in --quick (its 3 minutes on 2 cores)
        attempt(bench, "demo cached vs pixels", lambda: r.__setitem__(
            "cached_vs_pixels_stage1_demo", S1.cached_vs_pixels(bench, demo, p.demo_stage1_batch, peak)))
    grouping = S1.length_grouping(bench, 32 if p.real != "smoke" else 4, n=2000 if p.real != "smoke" else 64)
    found["length_grouping_padding_saved"] = grouping["saving"]
    if not p.structure:
        bench.notes.append("--quick: Blip2QFormerModel with eager attention, the Q-Former at batch 8, ViT-L/14 "
                           "and the demo's stage-1 shapes, fused vs LAVIS-style passes, padding, gradient "
                           "checkpointing, torch.compile, AdamW variants and DataLoader workers are measured by "
                           "the full run only")
        return
    trainer = build_trainer(real, bench, stage=1, batch_size=batch)
    files = SceneFiles(bench.work, real.file_size, 2 * batch)
    fixed = fixed_stage1_batch(trainer, files, batch)
    with bench.rounds(p.option_repeats):
        passes = attempt(bench, "fused vs LAVIS-style passes",
                         lambda: S1.fused_vs_unfused(bench, trainer, fixed, real.label, peak))
        if passes:
            r["fused_vs_lavis_passes_stage1"] = passes["lavis"]
            r["shared_image_kv_stage1"] = passes["shared_kv"]
            r["one_query_pass_stage1"] = passes["fused_pass"]
        attempt(bench, "dynamic padding", lambda: r.__setitem__(
            "dynamic_vs_max_padding_stage1", S1.dynamic_padding(bench, trainer, fixed, real.label)))
        if not p.options:
            return
        ck = attempt(bench, "stage-1 gradient checkpointing",
                     lambda: S1.checkpointing(bench, trainer, fixed, real.label))
        if ck:
            found["stage1_checkpointing"] = (f"step time x{ck['time_ratio']:.2f}, memory growth "
                                             f"{ck['mem_saving_mb']:.0f} MiB lower")
        opt = attempt(bench, "AdamW variants", lambda: S1.adamw(bench, trainer, real.label))
        if opt:
            r["fused_vs_foreach_adamw"] = opt["foreach"] / opt["fused"]
        w = attempt(bench, "DataLoader workers", lambda: S1.workers(bench, trainer, files, batch, real.label))
        if w:
            r["workers_pixels_stage1"] = w[0] / w[2]
        del trainer, fixed
        if not p.compile:
            return
        comp = attempt(bench, "torch.compile", lambda: S1.compiled(bench, real, batch, files)) or {}
        if comp.get("ok"):
            r["compile_stage1"] = comp["speedup"]
            found["compile_seconds"] = round(comp["compile_s"], 1)


def attempt(bench, title: str, fn):
    """``fn()``, or None with a note when it fails (e.g. out of memory at a searched batch size)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failed row must not hide the others
        bench.notes.append(f"{title} failed: {type(exc).__name__}: {str(exc)[:200]}")
        if os.environ.get("QVLM_DEBUG"):
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def stage1_batch_search(bench, shapes: Shapes, start: int, largest: int) -> int:
    """The largest power-of-two stage-1 batch (cached features) that runs, for GPUs."""
    from qvlm.bench.harness import SceneFiles, build_trainer, fixed_stage1_batch

    trainer = build_trainer(shapes, bench, stage=1, batch_size=start)
    files = SceneFiles(bench.work, shapes.file_size, largest)
    best, size = start, start
    while size <= largest:
        try:
            batch = fixed_stage1_batch(trainer, files, size)
            for _ in range(2):
                trainer.step(batch)
        except torch.OutOfMemoryError:
            break
        finally:
            trainer.opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best, size = size, size * 2
    bench.notes.append(f"stage-1 batch {best}: the largest power of two that fits (tried up to {largest})")
    del trainer
    return best


def section_stage2(bench, p: Plan, report: dict, peak, batch_search: int) -> None:
    from qvlm.bench.stage2 import bench_stage2, shared_prefix_rows

    attempt(bench, "stage 2 at demo shapes", lambda: bench_stage2(bench, shapes_of(p, "demo"), p.demo_stage2_batch,
                                                                  peak))
    if p.options:
        with bench.rounds(p.option_repeats):
            attempt(bench, "shared prompt prefix", lambda: report["ratios"].__setitem__(
                "shared_prefix_stage2", shared_prefix_rows(bench, shapes_of(p, "demo"), p.demo_stage2_batch)))
    # torch.compile of the stage-2 step on GPUs only: on CPU it compiles for minutes and gained nothing
    out = bench_stage2(bench, shapes_of(p, "real"), p.stage2_batch, peak, with_checkpointing=p.options,
                       batch_search=batch_search, option_repeats=p.option_repeats,
                       with_compile=p.compile and bench.device.type == "cuda")
    bench.models["real"] = out.pop("model")  # generation reuses it (weights only; the optimiser is gone)
    if "checkpointing" in out:
        ck = out["checkpointing"]
        report["findings"]["stage2_checkpointing"] = (f"step time x{ck['time_ratio']:.2f}, memory growth "
                                                      f"{ck['mem_saving_mb']:.0f} MiB lower")
    if "pad16_vs_longest" in out:
        report["ratios"]["pad16_vs_longest_stage2"] = out["pad16_vs_longest"]
    step = out["step"]
    if step.get("mfu") is not None:
        report["findings"]["stage2_mfu"] = step["mfu"]
    if step.get("device_busy") is not None:
        report["findings"]["stage2_device_busy"] = step["device_busy"]  # kernel time / step time
    if out.get("compile"):
        report["findings"]["stage2_compile_mfu"] = out["compile"]["row"].get("mfu")
        report["findings"]["stage2_compile_seconds"] = round(out["compile"]["compile_s"], 1)
        report["ratios"]["compile_stage2"] = step["ms"] / out["compile"]["row"]["ms"]
        if out["compile"]["row"].get("device_busy") is not None:
            report["findings"]["stage2_compile_device_busy"] = out["compile"]["row"]["device_busy"]
        largest = out["compile"].get("largest")
        if largest:  # GPUs: compiled layers fit a larger batch, where the host's share of the step shrinks
            report["findings"]["stage2_compile_largest_batch"] = largest["batch"]
            report["findings"]["stage2_compile_largest_mfu"] = largest.get("mfu")


def section_decode(bench, p: Plan, report: dict) -> None:
    """Compiled decoding steps (static KV cache) against the eager KV cache, at the real shapes.
    Not in the default sections: compiling takes minutes on a CPU."""
    from qvlm.bench.generation import bench_generation

    with bench.rounds(p.option_repeats):
        ratios = bench_generation(bench, shapes_of(p, "real"), p.gen_batch, p.gen_tokens, without_cache=False,
                                  compiled=True)
    report["ratios"]["compiled_decoding_generation"] = ratios["compiled_latency"]
    report["ratios"]["compiled_decoding_generation_batched"] = ratios["compiled_batched"]
    report["findings"]["generation_compile_seconds"] = ratios["compile_seconds"]


def section_generation(bench, p: Plan, report: dict) -> None:
    from qvlm.bench.generation import bench_generation

    with bench.rounds(p.option_repeats):
        ratios = bench_generation(bench, shapes_of(p, "real"), p.gen_batch, p.gen_tokens,
                                  vlm=bench.models.pop("real", None))
        report["ratios"]["kv_cache_generation"] = ratios["latency"]
        report["ratios"]["kv_cache_generation_batched"] = ratios["batched"]
        if p.gen_demo and p.demo != p.real:
            bench_generation(bench, shapes_of(p, "demo"), p.gen_batch, p.gen_tokens, without_cache=False)
