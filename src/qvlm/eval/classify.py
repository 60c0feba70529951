"""Zero-shot classification with the stage-1 Q-Former (CLIP-style, BLIP-2's ITC space).

Each class name fills a prompt template ("a photo of a {}"); an image takes the class whose prompt
is most similar (max over queries) in the ITC space. The true class of a record is the one class
name its caption mentions (as a whole word); records that mention none or several are not scored
and are counted as ``unlabelled``.
"""

from __future__ import annotations

import re

import torch

from qvlm.models.vlm import VLM


def caption_label(caption: str, classes: list[str]) -> int | None:
    """Index of the single class named in ``caption`` (whole words, case-insensitive), else None."""
    found = [i for i, name in enumerate(classes)
             if re.search(rf"\b{re.escape(name.lower())}\b", caption.lower())]
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def prompt_feats(model: VLM, tokenizer, classes: list[str], template: str, max_len: int) -> torch.Tensor:
    prompts = [template.format(name) for name in classes]
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model.qformer(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    return model.heads.text_feat(out.text)  # (C, E)


@torch.no_grad()
def classify_metrics(model: VLM, cfg, classes: list[str], template: str = "a photo of a {}",
                     source: str | None = None, split: str = "test") -> dict:
    from qvlm.eval.retrieval import eval_batches
    from qvlm.model_sources import load_tokenizer

    model.require_text("zero-shot classification")
    if len(classes) < 2:
        raise ValueError("zero-shot classification needs at least two class names")
    if "{}" not in template:
        raise ValueError(f"the prompt template must contain {{}} for the class name, got {template!r}")
    q = cfg.model.qformer
    tokenizer = load_tokenizer(q.tokenizer or q.source, cfg.model.trust_remote_code)
    text = prompt_feats(model, tokenizer, classes, template, q.max_text_len)
    correct = scored = unlabelled = 0
    per_class = {name: [0, 0] for name in classes}  # correct, total
    for batch in eval_batches(cfg, model, source, split):
        labels = [caption_label(c, classes) for c in batch["captions"]]
        keep = [i for i, y in enumerate(labels) if y is not None]
        unlabelled += len(labels) - len(keep)
        if not keep:
            continue
        emb = model.batch_image_embeds(batch)
        query = model.qformer(image_embeds=emb[keep]).query
        sim = torch.einsum("bqe,ce->bqc", model.heads.image_feats(query), text).max(dim=1).values  # (B, C)
        for pred, i in zip(sim.argmax(dim=1).tolist(), keep):
            per_class[classes[labels[i]]][1] += 1
            if pred == labels[i]:
                per_class[classes[labels[i]]][0] += 1
                correct += 1
            scored += 1
    if scored == 0:
        raise ValueError(f"no record's caption names exactly one of {classes}")
    return {"accuracy": correct / scored, "n": scored, "unlabelled": unlabelled,
            "per_class": {k: (c / t if t else None) for k, (c, t) in per_class.items()},
            "chance": 1 / len(classes)}
