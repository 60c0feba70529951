"""Caption generation benchmarks: latency per image (batch 1) and images/s batched, with the KV cache
(``GenerationConfig(use_cache=True)``: the prompt runs once, then one position per new token) and
without it (the whole sequence recomputed for every new token). Greedy decoding of a fixed number
of new tokens through ``qvlm.inference.describe_embeds`` (chat-template prompt with image slots),
from frozen features computed before timing. Both paths produce the same tokens.
"""

from __future__ import annotations

import torch

from qvlm.bench.harness import Bench, SceneFiles, row
from qvlm.bench.shapes import Shapes

GROUP = "caption generation"


def bench_generation(bench: Bench, shapes: Shapes, batch_size: int, new_tokens: int, vlm=None,
                     without_cache: bool = True) -> dict:
    """Rows for latency (batch 1) and throughput (``batch_size``), with the KV cache and (when
    ``without_cache``) without it; returns the no-cache / cache ratios. ``vlm``: a model with an LLM
    at ``shapes`` already built (else one is built)."""
    from qvlm.inference import describe_embeds
    from qvlm.models.generate import GenerationConfig
    from qvlm.models.vlm import VLM

    if vlm is None:
        torch.manual_seed(0)
        vlm = VLM.from_config(shapes.config(stage=2, precision=bench.precision), with_llm=True).to(bench.device)
    vlm.eval()
    files = SceneFiles(bench.work, shapes.file_size, max(batch_size, 8))
    dataset = files.dataset(decode=True)
    pixels = vlm.vision.processor([dataset[i]["image"] for i in range(batch_size)]).to(bench.device)
    with torch.no_grad(), bench.autocast():
        feats = vlm.vision(pixels).float()  # (B, N, Dv)
    produced: dict[str, list[int]] = {}

    def caption(n: int, use_cache: bool):
        gen = GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)

        def run():
            with bench.autocast():
                out = describe_embeds(vlm, feats[:n], gen=gen)
            produced[f"{n}-{use_cache}"] = [len(ids) for ids in out.token_ids]
        return run

    caches = (True, False) if without_cache else (True,)
    variants = {f"{n}-{c}": caption(n, c) for n in (1, batch_size) for c in caches}
    timings = bench.time(variants)
    prompt = describe_prompt_len(vlm)
    for key, timing in timings.items():
        n, cache = key.split("-")
        n, cache = int(n), cache == "True"
        tokens = sum(produced[key])
        kind = "latency, 1 image" if n == 1 else f"batched, {n} images"
        out = row(bench, GROUP, f"{kind}, {'KV cache' if cache else 'no cache'}", shapes.label, n,
                  f"prompt {prompt} tokens (Q={vlm.qformer.num_queries} image slots) + {new_tokens} new", timing,
                  items=n, item="images", note=f"{tokens} tokens generated")
        out["tokens_per_s"] = round(tokens / timing.median, 1)
        out["ms_per_image"] = round(out["ms"] / n, 1)
    if not without_cache:
        return {}
    return {"latency": timings["1-False"].median / timings["1-True"].median,
            "batched": timings[f"{batch_size}-False"].median / timings[f"{batch_size}-True"].median}


def describe_prompt_len(vlm) -> int:
    from qvlm.inference import default_prompts, prompt_batch

    system, user = default_prompts(vlm)
    ids, _, _ = prompt_batch(vlm, [user], system)
    return int(ids.shape[1])
