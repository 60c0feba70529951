"""``qvlm bench``: speed benchmarks with their references measured in the same run, on the same shapes.

Sections: the Q-Former forward + backward against ``transformers``' ``Blip2QFormerModel``
(``qformer_ref``); the stage-1 step from cached features vs from image files and the stage-2 step,
each with gradient checkpointing and ``torch.compile`` on/off in the full run (``stages``); and caption
generation with and without the KV cache (``generation``). Timing and memory come from ``timing``,
the stage-2 model FLOPs and MFU from ``flops``, the table and JSON from ``table``.

``run_bench(quick=..., device=..., precision=...)`` returns the report dict; its ``ratios`` hold
``qformer_vs_hf_blip2``, ``cached_vs_pixels_stage1`` and ``kv_cache_generation`` (ours faster by).
"""

from __future__ import annotations

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

from qvlm.bench.shapes import SHAPES
from qvlm.bench.timing import Ratio

__all__ = ["run_bench", "PLANS"]
RECIPE_BATCH = 32  # train.batch_size of configs/blip2-smollm2.yaml, the real shapes' recipe (a test keeps them equal)
HEADLINE = ("qformer_vs_hf_blip2", "cached_vs_pixels_stage1", "kv_cache_generation")


@dataclass(frozen=True)
class Plan:
    """How much to run: repeats, batch sizes per benchmark, which optional rows."""

    repeats: int  # timed rounds of the train steps (after ``warmup`` untimed ones)
    warmup: int
    option_repeats: int  # timed rounds of the other rows (checkpointing, compile, generation)
    qformer_repeats: int  # timed rounds of the Q-Former rows: cheap, and more rounds narrow its ratio's interval
    qformer_batch: int  # the real recipe's train.batch_size
    stage1_batch: int
    stage2_batch: int
    gen_batch: int
    gen_tokens: int
    options: bool  # gradient checkpointing on/off
    compile: bool  # torch.compile on/off (minutes of compilation on CPU)
    shapes: str = "real"


PLANS = {
    "quick": Plan(repeats=3, warmup=0, option_repeats=3, qformer_repeats=5, qformer_batch=RECIPE_BATCH,
                  stage1_batch=2, stage2_batch=2, gen_batch=4, gen_tokens=6, options=False, compile=False),
    "full": Plan(repeats=5, warmup=1, option_repeats=3, qformer_repeats=9, qformer_batch=RECIPE_BATCH,
                 stage1_batch=8, stage2_batch=8, gen_batch=8, gen_tokens=16, options=True, compile=True),
    # configs/tiny.yaml shapes everywhere: the unit tests' plan (seconds)
    "smoke": Plan(repeats=1, warmup=0, option_repeats=1, qformer_repeats=1, qformer_batch=2, stage1_batch=2,
                  stage2_batch=2, gen_batch=2, gen_tokens=2, options=True, compile=False, shapes="smoke"),
}
SECTIONS = ("qformer", "stage1", "stage2", "generation")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def check_sections(sections: tuple[str, ...]) -> None:
    """ValueError unless ``sections`` is a non-empty selection from ``SECTIONS``."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"unknown bench sections {unknown or list(sections)}; choose from {', '.join(SECTIONS)}")


def run_bench(quick: bool = False, device: str = "cpu", precision: str = "auto", plan: str | None = None,
              batch_search: int = 0, sections: tuple[str, ...] = SECTIONS,
              partial: Callable[[dict], None] | None = None) -> dict:
    """Run the ``sections`` in the order given and return the report (rows, ratios, notes, run
    details); ``partial(report)`` gets the report so far after each section (so a run stopped by a
    time limit still leaves its finished sections)."""
    from qvlm.bench import stages
    from qvlm.bench.flops import peak_bf16_flops
    from qvlm.bench.harness import Bench

    check_sections(sections)
    name = plan or ("quick" if quick else "full")
    p, dev, start = PLANS[name], torch.device(device), time.perf_counter()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(dev),
              "device_type": dev.type, "threads": torch.get_num_threads(), "quick": quick, "plan": name,
              "repeats": p.repeats, "warmup": p.warmup, "torch": torch.__version__, "load_avg_start": load_avg(),
              "ratios": {}, "sections": list(sections)}
    report["peak_bf16_flops"] = peak = peak_bf16_flops(report["device"]) if dev.type == "cuda" else None
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, once per model
        bench = Bench(dev, precision, p.repeats, p.warmup, Path(work))
        report["precision"] = bench.precision_label
        known = {
            "qformer": lambda: section_qformer(bench, p, report),
            "stage1": lambda: stages.section_stage1(bench, p, report, batch_search),
            "stage2": lambda: stages.section_stage2(bench, p, report, peak, batch_search),
            "generation": lambda: report["ratios"].update(section_generation(bench, p)),
        }
        for key in sections:
            t0 = time.perf_counter()
            print(f"bench: {key} ...", file=sys.stderr, flush=True)
            attempt(bench, f"section {key}", known[key])
            print(f"bench: {key} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if partial is not None:
                partial({**finish(report, bench, start), "partial": True})
        return finish(report, bench, start)


def finish(report: dict, bench, start: float) -> dict:
    """A copy of the report with the bench's rows and notes, the ratios rounded (the headline ones
    None where not measured) with their intervals, and the wall time."""
    ratios = {key: None for key in HEADLINE} | report["ratios"]
    intervals = {k: {"low": round(v.low, 3), "high": round(v.high, 3), "rounds": v.rounds,
                     "coverage": round(v.coverage, 3)} for k, v in ratios.items() if isinstance(v, Ratio)}
    return {**report, "rows": list(bench.rows), "notes": list(bench.notes), "ratio_intervals": intervals,
            "ratios": {k: (None if v is None else round(v, 3)) for k, v in ratios.items()},
            "load_avg_end": load_avg(), "wall_s": round(time.perf_counter() - start, 1)}


def attempt(bench, title: str, fn):
    """``fn()``, or None with a note when it fails (one failed row must not hide the others)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        bench.notes.append(f"{title} failed: {type(exc).__name__}: {str(exc)[:200]}")
        if os.environ.get("QVLM_DEBUG"):
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def section_qformer(bench, p: Plan, report: dict) -> None:
    """Ours against ``Blip2QFormerModel`` (SDPA) at the plan's batch, the real recipe's training batch."""
    from qvlm.bench.harness import row
    from qvlm.bench.qformer_ref import build_pair, comparable_params, fwd_bwd

    if p.shapes == "smoke":
        dims, tokens = dict(hidden=32, layers=2, heads=2, intermediate=64, vision_width=32, queries=4), 17
    else:  # BERT-base on ViT-B/16 at 224 px
        dims, tokens = dict(hidden=768, layers=12, heads=12, intermediate=3072, vision_width=768, queries=32), 197
    modules = {k: m.to(bench.device) for k, m in build_pair(**dims).items()}
    counts = {k: comparable_params(m) for k, m in modules.items()}
    g = torch.Generator().manual_seed(0)
    image = torch.randn(p.qformer_batch, tokens, dims["vision_width"], generator=g).to(bench.device)
    probe = torch.randn(dims["queries"], dims["hidden"], generator=g).to(bench.device)
    with bench.rounds(p.qformer_repeats):
        timings = bench.time({k: (lambda m=m: fwd_bwd(m, image, probe, bench.autocast())) for k, m in modules.items()})
    label = (f"{dims['layers']} layers, width {dims['hidden']}, {dims['heads']} heads, FFN {dims['intermediate']}, "
             f"cross-attn every 2, Dv {dims['vision_width']}")
    names = {"ours": "ours (qvlm QFormer, SDPA)", "hf": "transformers Blip2QFormerModel, sdpa"}
    for key, timing in timings.items():
        row(bench, "Q-Former fwd+bwd (query path + image cross-attention)", names[key], label, p.qformer_batch,
            f"Q={dims['queries']} N={tokens}", timing, note=f"{counts[key]} params compared")
    report["ratios"]["qformer_vs_hf_blip2"] = Ratio.of(timings["hf"], timings["ours"])


def section_generation(bench, p: Plan) -> dict[str, Ratio]:
    from qvlm.bench.generation import bench_generation

    with bench.rounds(p.option_repeats):
        return bench_generation(bench, SHAPES[p.shapes], p.gen_batch, p.gen_tokens)
