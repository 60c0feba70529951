"""Caption generation benchmarks: latency per image (batch 1) and images/s batched, with the KV cache
(``GenerationConfig(use_cache=True)``: the prompt runs once, then one position per new token) and
without it (the whole sequence recomputed for every new token), and (``compiled``) with the KV
cache static and every decoding step one compiled forward (``GenerationConfig(compile=True)``; its
compilation is timed on its own, before the timed calls). Greedy decoding of a fixed number of new
tokens through ``qvlm.inference.describe_embeds`` (chat-template prompt with image slots), from
frozen features computed before timing. All paths produce the same tokens.
"""

from __future__ import annotations

import time

import torch

from qvlm.bench.harness import Bench, SceneFiles, row
from qvlm.bench.shapes import Shapes
from qvlm.bench.timing import Ratio

GROUP = "caption generation"
COMPILED_GROUP = "caption generation: compiled decoding"
MODES = {"cache": "KV cache", "nocache": "no cache", "compiled": "KV cache, compiled decoding"}


def bench_generation(bench: Bench, shapes: Shapes, batch_size: int, new_tokens: int, vlm=None,
                     without_cache: bool = True, compiled: bool = False) -> dict:
    """Rows for latency (batch 1) and throughput (``batch_size``), with the KV cache, (when
    ``without_cache``) without it and (when ``compiled``) with compiled decoding steps; returns the
    ratios against the eager KV cache: {"latency", "batched"} (no cache / cache) and
    {"compiled_latency", "compiled_batched", "compile_seconds"}. ``vlm``: a model with an LLM at
    ``shapes`` already built (else one is built). With ``compiled`` the rows go to a group of their
    own (``qvlm bench --sections decode``), so the eager rows there do not repeat the plain ones."""
    from qvlm.inference import describe_embeds
    from qvlm.models.generate import GenerationConfig
    from qvlm.models.vlm import VLM

    if vlm is None:
        torch.manual_seed(0)
        vlm = VLM.from_config(shapes.config(stage=2, precision=bench.precision), with_llm=True).to(bench.device)
    vlm.eval()
    feats = image_features(bench, vlm, shapes, batch_size)
    produced: dict[str, list[int]] = {}

    def caption(n: int, mode: str):
        gen = GenerationConfig(max_new_tokens=new_tokens, use_cache=mode != "nocache", compile=mode == "compiled")

        def run():
            with bench.autocast():
                produced[f"{n}-{mode}"] = describe_embeds(vlm, feats[:n], gen=gen).token_ids
        return run

    modes = ["cache"] + ["nocache"] * without_cache + ["compiled"] * compiled
    variants = {f"{n}-{m}": caption(n, m) for n in (1, batch_size) for m in modes}
    compile_seconds = {}
    for key in [k for k in variants if k.endswith("compiled")]:  # the first call compiles: not a timed call
        start = time.perf_counter()
        variants[key]()
        compile_seconds[key] = time.perf_counter() - start
    timings = bench.time(variants)
    rows(bench, vlm, shapes, timings, produced, compile_seconds, new_tokens, compiled)
    b = batch_size
    ratios = {}
    if compiled:
        ratios["compiled_latency"] = Ratio.of(timings["1-cache"], timings["1-compiled"])
        ratios["compiled_batched"] = Ratio.of(timings[f"{b}-cache"], timings[f"{b}-compiled"])
        ratios["compile_seconds"] = round(sum(compile_seconds.values()), 1)
    if without_cache:
        ratios["latency"] = Ratio.of(timings["1-nocache"], timings["1-cache"])
        ratios["batched"] = Ratio.of(timings[f"{b}-nocache"], timings[f"{b}-cache"])
    return ratios


def image_features(bench: Bench, vlm, shapes: Shapes, batch_size: int) -> torch.Tensor:
    """Frozen features (B, N, Dv) of ``batch_size`` synthetic scene files, computed before timing."""
    dataset = SceneFiles(bench.work, shapes.file_size, max(batch_size, 8)).dataset(decode=True)
    pixels = vlm.vision.processor([dataset[i]["image"] for i in range(batch_size)]).to(bench.device)
    with torch.no_grad(), bench.autocast():
        return vlm.vision(pixels).float()


def rows(bench: Bench, vlm, shapes: Shapes, timings: dict, produced: dict, compile_seconds: dict,
         new_tokens: int, compiled: bool) -> None:
    from qvlm.inference import default_prompt_len

    prompt = default_prompt_len(vlm)
    for key, timing in timings.items():
        n, mode = key.split("-")
        n = int(n)
        tokens = sum(len(ids) for ids in produced[key])
        kind = "latency, 1 image" if n == 1 else f"batched, {n} images"
        note = f"{tokens} tokens generated"
        if key in compile_seconds:
            note += f"; its first call (compiling) took {compile_seconds[key]:.0f} s"
            if produced[key] != produced[f"{n}-cache"]:
                bench.notes.append(f"compiled decoding gave other tokens than the eager decoder ({shapes.label}, "
                                   f"batch {n}, {bench.precision_label}; in bf16 a near-tie may flip a token)")
        out = row(bench, COMPILED_GROUP if compiled else GROUP, f"{kind}, {MODES[mode]}", shapes.label, n,
                  f"prompt {prompt} tokens (Q={vlm.qformer.num_queries} image slots) + {new_tokens} new", timing,
                  items=n, item="images", note=note)
        out["tokens_per_s"] = round(tokens / timing.median, 1)
        out["ms_per_image"] = round(out["ms"] / n, 1)
