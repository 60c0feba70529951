"""Caption generation benchmarks: latency per image (batch 1) and images/s batched, with the KV cache
(``GenerationConfig(use_cache=True)``: the prompt runs once, then one position per new token) and
without it (the whole sequence recomputed for every new token). Greedy decoding of a fixed number of
new tokens through ``qvlm.inference.describe_embeds`` (chat-template prompt with image slots), from
frozen features computed before timing. Both paths produce the same tokens.
"""

from __future__ import annotations

import torch

from qvlm.bench.harness import Bench, SceneFiles, row
from qvlm.bench.shapes import Shapes
from qvlm.bench.timing import Ratio


def bench_generation(bench: Bench, shapes: Shapes, batch_size: int, new_tokens: int) -> dict[str, Ratio]:
    """Rows for latency (batch 1) and throughput (``batch_size``) with and without the KV cache, on a
    fresh model at ``shapes``; returns the ratios no cache / cache: {"kv_cache_generation",
    "kv_cache_generation_batched"}."""
    from qvlm.inference import default_prompt_len, describe_embeds
    from qvlm.models.generate import GenerationConfig
    from qvlm.models.vlm import VLM

    torch.manual_seed(0)
    vlm = VLM.from_config(shapes.config(stage=2, precision=bench.precision), with_llm=True).to(bench.device)
    vlm.eval()
    feats = image_features(bench, vlm, shapes, batch_size)
    produced: dict[tuple[int, bool], list[list[int]]] = {}

    def caption(n: int, cache: bool):
        gen = GenerationConfig(max_new_tokens=new_tokens, use_cache=cache)

        def run():
            with bench.autocast():
                produced[n, cache] = describe_embeds(vlm, feats[:n], gen=gen).token_ids
        return run

    timings = bench.time({(n, cache): caption(n, cache) for n in (1, batch_size) for cache in (True, False)})
    seq = f"prompt {default_prompt_len(vlm)} tokens (Q={vlm.qformer.num_queries} image slots) + {new_tokens} new"
    for (n, cache), timing in timings.items():
        tokens = sum(len(ids) for ids in produced[n, cache])
        kind = "latency, 1 image" if n == 1 else f"batched, {n} images"
        out = row(bench, "caption generation", f"{kind}, {'KV cache' if cache else 'no cache'}", shapes.label, n,
                  seq, timing, item="images", note=f"{tokens} tokens generated")
        out["tokens_per_s"] = round(tokens / timing.median, 1)
    return {"kv_cache_generation": Ratio.of(timings[1, False], timings[1, True]),
            "kv_cache_generation_batched": Ratio.of(timings[batch_size, False], timings[batch_size, True])}


def image_features(bench: Bench, vlm, shapes: Shapes, batch_size: int) -> torch.Tensor:
    """Frozen features (B, N, Dv) of ``batch_size`` synthetic scene files, computed before timing."""
    dataset = SceneFiles(bench.work, shapes.file_size, max(batch_size, 8)).dataset(decode=True)
    pixels = vlm.vision.processor([dataset[i]["image"] for i in range(batch_size)]).to(bench.device)
    with torch.no_grad(), bench.autocast():
        return vlm.vision(pixels).float()
