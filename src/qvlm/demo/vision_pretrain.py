"""Pretrain the offline demo's vision tower on the synthetic scenes' attribute labels (``qvlm pretrain-vision``).

No pretrained image backbone installs offline, so this trains a small HF ``ViTModel`` (by default
64 px, patch 8, width 192, 4 layers) to recognise, for each of the five positions, whether it holds
an object and that object's colour, shape and size. The labels are factorised (one cross-entropy
per attribute, colour/shape/size ignored where the position is empty), so held-out colour-shape
pairs remain recognisable.

Three readouts (thrown away after training; only the tower is kept):
- ``spatial`` (default): one linear head shared by every token, pooled per position with learned
  weights that start as a bump around the position's centre. Each token must then describe its own
  region in one code, which is what a Q-Former's cross-attention can read (stage-1 retrieval is
  much better than with the flat readout).
- ``bound``: ``spatial`` plus a scene head on the mean of the tokens (``BoundReadout``).
- ``flat``: one linear layer over all output tokens flattened, (B, N*Dv) -> logits; as accurate,
  but the code may be spread over all tokens.

With ``grey_view`` (for ``model.vision.grey_view``, which feeds the tower each image and a grey copy)
half of the training images are shown grey and supervise presence, shape and size; the other half
stay in colour and supervise presence, colour and size, never shape, through the per-token head
(the bound readout's scene head on the mean token still learns every attribute of a colour image,
which keeps an object's attributes bound together). In the training split colour predicts shape
(green is never a circle there), and a tower that learns shape from colour images uses that and
misnames the shapes of never-trained pairs; learned from grey images only, shape is read from the
outline. Evaluation then takes colour, presence and size from the colour view and shape from the
grey view.

The early stop (``target_acc``) watches the per-token head. The bound readout's scene head, which a
broadly averaging Q-Former query reads, learns more slowly and keeps improving (and with it the
stage-1 Q-Former's captions) after the token head is nearly perfect. ``evaluate`` reports it as
``scene_object_acc``; the demo trains its tower for the whole step budget.

The tower is saved in HF format (config.json, model.safetensors, preprocessor_config.json) so
``model.vision.source`` can point at it and it is then frozen like any pretrained backbone. The real
recipe skips all this and uses a hub backbone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from qvlm.data.synth import CENTERS, COLORS, POSITIONS, SHAPES, SIZES, make_scene, render
from qvlm.models.vision import ImageProcessor, to_grey

ATTRIBUTES = ("color", "shape", "size")
VOCAB = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}
HEADS = {"presence": 2, **{a: len(VOCAB[a]) for a in ATTRIBUTES}}  # logits per position
IGNORE = -100  # target of colour/shape/size at an empty position
CHECK_EVERY = 50  # steps between held-in checks (early stop at target_acc)
N_CHECK = 256  # held-in check images: train-split indices just past the pool, never trained on


def scene_targets(scene) -> list[list[int]]:
    """(P, 4) rows [present, colour, shape, size] in POSITIONS order; IGNORE for an empty position."""
    return [[0, IGNORE, IGNORE, IGNORE] if a is None else [1, *(VOCAB[k].index(a[k]) for k in ATTRIBUTES)]
            for a in (scene.attributes()[pos] for pos in POSITIONS)]


def render_pool(seed: int, split: str, start: int, n: int, processor: ImageProcessor) -> tuple[Tensor, Tensor]:
    """Scenes ``start .. start+n`` of ``split`` -> uint8 pixels (n, 3, H, W) and targets (n, P, 4)."""
    arrays, targets = [], []
    for i in range(start, start + n):
        scene = make_scene(seed, split, i)
        arrays.append(processor.to_array(render(scene, processor.size)))  # (H, W, 3) uint8
        targets.append(scene_targets(scene))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)
    return pixels, torch.tensor(targets, dtype=torch.long)


def normalise(pixels: Tensor, processor: ImageProcessor) -> Tensor:
    """uint8 (B, 3, H, W) -> float, exactly as ``ImageProcessor.__call__`` does it."""
    mean = torch.tensor(processor.mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.std).view(1, 3, 1, 1)
    return (pixels.float().div_(255.0) - mean) / std


class Readout(nn.Module):
    """Flat linear readout: all tokens (B, N, Dv) -> per-position logits (B, P, sum(HEADS))."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.per_position = sum(HEADS.values())
        self.linear = nn.Linear(num_tokens * width, len(POSITIONS) * self.per_position)

    def forward(self, tokens: Tensor) -> Tensor:
        logits = self.linear(tokens.flatten(1))  # (B, N*Dv) -> (B, P*H)
        return logits.view(tokens.shape[0], len(POSITIONS), self.per_position)  # (B, P, H)


class SpatialReadout(nn.Module):
    """Token-wise readout: one linear head shared by every patch token (B, N, Dv) -> (B, N, H), then
    per position a learned softmax-weighted average over the tokens -> (B, P, H). The shared head
    makes every token describe, in one linear code, the object it covers (or the background), so a
    Q-Former query that attends to a region reads that region's object; the flat readout lets the
    code be spread over all tokens instead. The pooling weights start as a Gaussian bump around each
    position's centre on the patch grid (learned from there; uniform weights barely learned)."""

    def __init__(self, num_tokens: int, width: int, sigma: float = 0.1):
        super().__init__()
        self.per_position = sum(HEADS.values())
        self.head = nn.Linear(width, self.per_position)
        self.where = nn.Parameter(position_prior(num_tokens, sigma))

    def forward(self, tokens: Tensor) -> Tensor:
        per_token = self.head(tokens)  # (B, N, H)
        return torch.einsum("pn,bnh->bph", self.where.softmax(dim=-1).to(per_token.dtype), per_token)


def position_prior(num_tokens: int, sigma: float) -> Tensor:
    """(P, N) pooling logits: -d^2 / (2 sigma^2) from each position's centre to each patch centre (in
    image sides), the [CLS] token (index 0) left out (-1e4)."""
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"expected [CLS] + a square grid of patches, got {num_tokens} tokens")
    centre = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centre, centre, indexing="ij")  # patch order: row-major, like ViT
    logits = []
    for pos in POSITIONS:
        cx, cy = CENTERS[pos]
        d2 = (xs.flatten() - cx) ** 2 + (ys.flatten() - cy) ** 2
        logits.append(torch.cat([torch.tensor([-1e4]), -d2 / (2 * sigma ** 2)]))
    return torch.stack(logits)


class BoundReadout(SpatialReadout):
    """The spatial readout plus a scene head: one linear map from the mean of all tokens (B, Dv) to
    every position's logits (B, P, H), trained with the same targets (``extra_logits``). The mean of
    the tokens must then say which object is where, so a Q-Former query whose cross-attention is
    still a broad average (as at the start of stage 1) reads colour, shape, size and position
    together, instead of a bag of colours and shapes with their places lost."""

    def __init__(self, num_tokens: int, width: int, sigma: float = 0.1):
        super().__init__(num_tokens, width, sigma)
        self.scene = nn.Linear(width, len(POSITIONS) * self.per_position)

    def extra_logits(self, tokens: Tensor) -> Tensor:
        return self.scene(tokens.mean(dim=1)).view(tokens.shape[0], len(POSITIONS), self.per_position)


READOUTS = {"flat": Readout, "spatial": SpatialReadout, "bound": BoundReadout}


def split_logits(logits: Tensor) -> dict[str, Tensor]:
    """(B, P, sum(HEADS)) -> {"presence": (B, P, 2), "color": (B, P, 6), "shape": ..., "size": ...}."""
    return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))


def readout_loss(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Named cross-entropies (targets (B, P, 4)); ``loss`` is their sum. Empty positions are ignored
    by the colour/shape/size terms."""
    heads = split_logits(logits.float())
    losses = {name: F.cross_entropy(heads[name].flatten(0, 1), targets[..., i].flatten(), ignore_index=IGNORE)
              for i, name in enumerate(HEADS)}
    losses["loss"] = sum(losses.values())
    return losses


def predict(logits: Tensor) -> Tensor:
    """Logits -> (B, P, 4) [present, colour, shape, size]; attributes of a predicted-empty position are -1."""
    heads = split_logits(logits)
    pred = torch.stack([heads[name].argmax(-1) for name in HEADS], dim=-1)  # (B, P, 4)
    pred[..., 1:][pred[..., 0] == 0] = -1
    return pred


def attribute_accuracy(pred: Tensor, targets: Tensor) -> dict[str, float]:
    """Per-attribute accuracy of predictions ``pred`` against ``targets`` (both (B, P, 4)).

    ``attr_acc`` is the mean over every (image, position, attribute in colour/shape/size), B*P*3
    cases: at an occupied position an attribute counts as correct when the position is predicted
    occupied and the attribute's argmax is right; at an empty position all three count as correct
    exactly when the position is predicted empty. Empty positions are easy and make up most
    positions, so ``object_acc`` (the same, over occupied positions only) and ``presence_acc`` are
    reported too, and per attribute over occupied positions (``color_acc``, ``shape_acc``,
    ``size_acc``).
    """
    present = targets[..., 0] == 1  # (B, P)
    hit_present = (pred[..., 0] == 1) & present
    attr_ok = (pred[..., 1:] == targets[..., 1:]) & hit_present.unsqueeze(-1)  # (B, P, 3)
    empty_ok = (~present & (pred[..., 0] == 0)).unsqueeze(-1).expand_as(attr_ok)
    correct = attr_ok | empty_ok
    n_obj = int(present.sum())
    out = {"attr_acc": correct.float().mean().item(),
           "object_acc": attr_ok[present].float().mean().item() if n_obj else float("nan"),
           "presence_acc": (pred[..., 0] == targets[..., 0]).float().mean().item()}
    for i, name in enumerate(ATTRIBUTES):  # e.g. shape_acc: shape right at an occupied position
        out[f"{name}_acc"] = attr_ok[..., i][present].float().mean().item() if n_obj else float("nan")
    return out


def build_tower(image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int,
                seed: int):
    """A fresh ``ViTModel`` (no dropout) of that shape; raises ValueError on a bad shape.

    The pooler is kept though never trained or used: ``AutoModel.from_pretrained`` builds one, and
    if the checkpoint lacked it its weights would be drawn anew at every load, changing the tower's
    fingerprint (the frozen-feature cache key) from run to run.
    """
    from transformers import ViTConfig, ViTModel

    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}")
    if num_heads <= 0 or hidden_size % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide hidden_size {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       intermediate_size=4 * hidden_size, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return ViTModel(config, add_pooling_layer=True)


def lr_at_progress(progress: float, base_lr: float, warmup: float = 0.05, min_ratio: float = 0.05) -> float:
    """Learning rate at ``progress`` in [0, 1] of the step budget: linear warm-up over the first
    ``warmup``, then cosine down to ``base_lr * min_ratio``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.01)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))
    return base_lr * (min_ratio + (1.0 - min_ratio) * cosine)


@torch.no_grad()
def evaluate(tower, readout: nn.Module, pixels: Tensor, targets: Tensor, processor: ImageProcessor,
             batch_size: int = 200, grey_view: bool = False) -> dict[str, float]:
    """``attribute_accuracy`` of tower + readout on uint8 ``pixels``, in fp32 (as the frozen tower runs).
    With ``grey_view`` the shapes are read from grey copies of the images, the rest from the colour ones.
    A bound readout's scene head is scored too, on the colour images (``scene_attr_acc``,
    ``scene_object_acc``): it is what a Q-Former query that averages the whole image can read."""
    was_training = tower.training
    tower.eval()
    preds, scene_preds = [], []
    for i in range(0, len(pixels), batch_size):
        pixel_values = normalise(pixels[i:i + batch_size], processor)
        tokens = tower(pixel_values=pixel_values).last_hidden_state  # (b, N, Dv)
        pred = predict(readout(tokens))  # (b, P, 4)
        if grey_view:
            shape = predict(readout(tower(pixel_values=to_grey(pixel_values, processor)).last_hidden_state))[..., 2]
            pred[..., 2] = torch.where(pred[..., 0] == 1, shape, -1)  # occupied per the colour view
        preds.append(pred)
        if hasattr(readout, "extra_logits"):
            scene_preds.append(predict(readout.extra_logits(tokens)))
    tower.train(was_training)
    out = attribute_accuracy(torch.cat(preds), targets)
    if scene_preds:
        scene = attribute_accuracy(torch.cat(scene_preds), targets)
        out.update(scene_attr_acc=scene["attr_acc"], scene_object_acc=scene["object_acc"])
    return out


def grey_split(pixel_values: Tensor, targets: Tensor, grey: Tensor,
               processor: ImageProcessor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``grey_view`` training batch: images where ``grey`` (B,) is True turned grey with their colour
    target ignored. Returns the pixels, the per-token head's targets (shape ignored on colour images:
    shape is learned from grey images only) and the scene head's (shape kept on colour images: that
    head binds every attribute of an object). Copies the inputs."""
    pixel_values, scene = pixel_values.clone(), targets.clone()
    pixel_values[grey] = to_grey(pixel_values[grey], processor)
    scene[grey, :, 1] = IGNORE  # no colour in a grey image
    tokens = scene.clone()
    tokens[~grey, :, 2] = IGNORE
    return pixel_values, tokens, scene


def train_step(tower, readout: nn.Module, opt, pixels: Tensor, targets: Tensor, processor: ImageProcessor,
               autocast: bool, grey: Tensor | None = None) -> dict[str, Tensor]:
    """One AdamW step on a batch (uint8 pixels (B, 3, H, W), targets (B, P, 4)); returns the losses.
    ``grey`` (B,) bool: the ``grey_view`` split of the batch (``grey_split``)."""
    pixel_values, scene = normalise(pixels, processor), targets  # scene: the scene head's targets
    if grey is not None:
        pixel_values, targets, scene = grey_split(pixel_values, targets, grey, processor)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tokens = tower(pixel_values=pixel_values).last_hidden_state  # (B, N, Dv)
        losses = readout_loss(readout(tokens), targets)
        if hasattr(readout, "extra_logits"):  # BoundReadout's scene head
            losses["scene"] = readout_loss(readout.extra_logits(tokens), scene)["loss"]
            losses["loss"] = losses["loss"] + losses["scene"]
    if not torch.isfinite(losses["loss"]):
        raise FloatingPointError(f"pretrain-vision: loss is {losses['loss'].item()}")
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return losses


def build_optimizer(tower, readout: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and the [CLS]/position embeddings."""
    named = list(tower.named_parameters()) + list(readout.named_parameters())
    decays = {n: p.ndim >= 2 and "embeddings" not in n for n, p in named}
    groups = [{"params": [p for n, p in named if decays[n]], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays[n]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def train_readout(tower, readout: nn.Module, pool: tuple[Tensor, Tensor], check: tuple[Tensor, Tensor],
                  processor: ImageProcessor, *, max_steps: int, batch_size: int, lr: float, weight_decay: float,
                  target_acc: float, seed: int, progress: bool, grey_view: bool = False, bf16: bool = False,
                  max_seconds: float | None = None) -> dict:
    """The loop: lr from the steps done, a batch sampled from the pool, a step; every CHECK_EVERY
    steps a held-in check that may stop early at ``target_acc``. What is trained depends on the
    steps only; ``max_seconds`` (off in the demo) is a cap for a standalone run that may end it early."""
    opt = build_optimizer(tower, readout, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=max_steps, desc="pretrain-vision", file=sys.stderr, disable=not progress)
    start, step, check_acc = time.perf_counter(), 0, float("nan")
    tower.train()
    while step < max_steps and (max_seconds is None or time.perf_counter() - start < max_seconds):
        for group in opt.param_groups:
            group["lr"] = lr_at_progress(step / max_steps, lr)
        idx = torch.randint(len(pool[0]), (batch_size,), generator=gen)
        grey = torch.rand(batch_size, generator=gen) < 0.5 if grey_view else None  # (B,)
        losses = train_step(tower, readout, opt, pool[0][idx], pool[1][idx], processor, bf16, grey)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{group['lr']:.1e}", check=f"{check_acc:.3f}",
                        refresh=False)
        if step % CHECK_EVERY == 0:
            check_acc = evaluate(tower, readout, *check, processor, grey_view=grey_view)["attr_acc"]
            if check_acc >= target_acc:
                break
    bar.close()
    train_s = time.perf_counter() - start
    return {"steps": step, "train_s": round(train_s, 1), "check_acc": check_acc, "bf16": bf16,
            "step_s": round(train_s / max(step, 1), 3)}


def save_tower(out: Path, tower, readout: nn.Module, processor: ImageProcessor, metrics: dict) -> None:
    """Write the HF-format tower, its preprocessor config, the readout and metrics.json atomically:
    into a hidden temporary folder beside ``out``, then renamed (an old ``out`` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tower.save_pretrained(tmp)
        preprocessor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
                        "rescale_factor": 1 / 255, "do_normalize": True, "do_center_crop": processor.crop,
                        "size": {"height": processor.size, "width": processor.size},
                        "image_mean": list(processor.mean), "image_std": list(processor.std),
                        "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}[processor.resample]}
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in readout.state_dict().items()}, str(tmp / "readout.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def run_pretrain_vision(out: str | Path, *, seed: int = 0, image_size: int = 64, patch_size: int = 8,
                        hidden_size: int = 192, num_layers: int = 4, num_heads: int = 4,
                        max_steps: int = 600, max_seconds: float | None = None, batch_size: int = 32,
                        lr: float = 5e-4, weight_decay: float = 0.05, n_train: int = 12000,
                        n_eval: int = 400, target_acc: float = 0.99, readout: str = "spatial",
                        grey_view: bool = False, bf16: bool = False, progress: bool = True) -> dict:
    """Train the demo vision tower and save it to ``out``; returns the metrics (also in metrics.json).

    Renders ``n_train`` train-split scenes, then trains on them for ``max_steps`` (bf16 autocast with
    ``bf16``), or fewer once the held-in check reaches ``target_acc`` (> 1: never) or when
    ``max_seconds`` of training have passed (None: no time cap, the same tower on any machine).
    Then reports ``attribute_accuracy`` on ``n_eval`` i.i.d. test-split images (``attr_acc``) and on
    ``n_eval`` held-out-pair images (``heldout_attr_acc``). Nothing is written unless the run succeeds.
    ``grey_view``: train and evaluate for ``model.vision.grey_view`` (module docstring).
    """
    settings = {k: v for k, v in locals().items() if k not in ("out", "progress")}  # the arguments
    if (max_seconds is not None and max_seconds <= 0) or min(max_steps, batch_size, n_train, n_eval) < 1:
        raise ValueError("max_seconds, max_steps, batch_size, n_train and n_eval must be positive")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    out = Path(out)
    wall = time.perf_counter()
    tower = build_tower(image_size, patch_size, hidden_size, num_layers, num_heads, seed)
    processor = ImageProcessor(size=image_size)  # mean/std 0.5, bicubic, no crop: what from_source reads back
    num_tokens = (image_size // patch_size) ** 2 + 1  # patches + [CLS]
    readout = READOUTS[readout](num_tokens, hidden_size)
    pool = render_pool(seed, "train", 0, n_train, processor)
    check = render_pool(seed, "train", n_train, N_CHECK, processor)
    render_s = time.perf_counter() - wall
    run = train_readout(tower, readout, pool, check, processor, max_steps=max_steps, max_seconds=max_seconds,
                        batch_size=batch_size, lr=lr, weight_decay=weight_decay, target_acc=target_acc, seed=seed,
                        progress=progress, grey_view=grey_view, bf16=bf16)
    test = evaluate(tower, readout, *render_pool(seed, "test", 0, n_eval, processor), processor, grey_view=grey_view)
    heldout = evaluate(tower, readout, *render_pool(seed, "heldout", 0, n_eval, processor), processor,
                       grey_view=grey_view)
    metrics = {"attr_acc": test["attr_acc"], "heldout_attr_acc": heldout["attr_acc"],
               "object_acc": test["object_acc"], "heldout_object_acc": heldout["object_acc"],
               "shape_acc": test["shape_acc"], "heldout_shape_acc": heldout["shape_acc"],
               "presence_acc": test["presence_acc"], "scene_object_acc": test.get("scene_object_acc"),
               "check_acc": run["check_acc"],
               "steps": run["steps"], "train_s": run["train_s"], "render_s": round(render_s, 1),
               "wall_s": round(time.perf_counter() - wall, 1), "bf16": run["bf16"], "step_s": run["step_s"],
               "params": sum(p.numel() for p in tower.parameters()), "settings": settings}
    save_tower(out, tower, readout, processor, metrics)
    return metrics
