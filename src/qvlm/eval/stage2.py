"""Caption evaluation of a stage-2 model on a data source: generate, then score (COCO metrics, and
scene-level scores when records carry synthetic-scene attributes)."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from qvlm.models.generate import GenerationConfig


@torch.no_grad()
def generate_captions(vlm, records: list[dict], batch_size: int = 16, max_new_tokens: int = 32,
                      progress: bool = False, compile: bool = False) -> list[str]:
    """Greedy captions (the model's first user prompt) for records with decoded images; a stage-1
    model (no LLM) captions with the Q-Former's own ITG head. ``compile``: compiled decoding steps
    (``GenerationConfig.compile``; stage-2 models only)."""
    from qvlm.inference import caption, qformer_caption

    gen = GenerationConfig(max_new_tokens=max_new_tokens, compile=compile)
    out: list[str] = []
    bar = tqdm(total=len(records), desc="captioning", unit="img", file=sys.stderr, disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [r["image"] for r in chunk]
        if vlm.llm is None:
            out.extend(qformer_caption(vlm, images, max_new_tokens, batch_size))
        else:
            out.extend(caption(vlm, images, gen=gen, batch_size=batch_size))
        bar.update(len(chunk))
    bar.close()
    return out


def evaluate_captions(vlm, cfg, source: str | None = None, split: str = "test", max_samples: int | None = None,
                      progress: bool = False, coco: bool = True, compile: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, samples): COCO caption metrics against each record's caption (unless ``coco`` is
    False: they run Java twice), plus ``color_shape_acc``, ``count_acc`` and ``exact_match`` when the
    records have scene attributes."""
    from qvlm.eval.captioning import caption_metrics, scene_metrics
    from qvlm.eval.retrieval import load_records

    records = load_records(cfg, source, split, max_samples or cfg.eval.max_samples)
    if not records:
        raise ValueError("caption evaluation got no usable records")
    preds = generate_captions(vlm, records, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress, compile)
    metrics = {"n": len(records)}
    if coco:
        metrics.update(caption_metrics(preds, [[r["caption"]] for r in records]))
    if all(r.get("attributes") for r in records):
        metrics.update(scene_metrics(preds, [r["attributes"] for r in records]))
    samples = [{"key": r["key"], "image": r["image"], "caption": p, "truth": r["caption"],
                "attributes": r.get("attributes")} for r, p in zip(records, preds)]
    return metrics, samples
