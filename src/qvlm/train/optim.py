"""AdamW with named parameter groups and a pure cosine-with-warm-up schedule.

Groups follow the model: each trainable block (qformer, queries, heads, projector, lora) gets its
own learning rate; norms, biases and the query tokens get no weight decay (nanoGPT's decay /
no-decay split, with the counts printed at start).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qvlm.config import TrainConfig


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``base_lr``, then cosine down to
    ``base_lr * min_lr_ratio`` at ``max_steps``; flat at the minimum after that."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    if step >= max_steps:
        return min_lr
    span = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (1-d) and the learnable query tokens are not decayed."""
    return param.ndim < 2 or name.endswith("bias") or "query_tokens" in name or "norm" in name.lower()


def group_lr(cfg: TrainConfig, group: str) -> float:
    specific = {"qformer": cfg.lr_qformer, "queries": cfg.lr_qformer, "heads": cfg.lr_qformer,
                "projector": cfg.lr_projector, "lora": cfg.lr_lora}.get(group, 0.0)
    return specific or cfg.lr


def build_optimizer(named_groups: dict[str, list[tuple[str, nn.Parameter]]], cfg: TrainConfig,
                    fused: bool | None = None) -> tuple[torch.optim.AdamW, dict[str, dict[str, int]]]:
    """AdamW over ``{group: [(name, param)]}``; returns the optimiser and per-group counts.

    Each param group carries ``name`` and ``base_lr`` so the loop can apply ``lr_at`` per group.
    """
    param_groups, counts = [], {}
    for group, named in named_groups.items():
        decay = [p for n, p in named if p.requires_grad and not no_decay(n, p)]
        plain = [p for n, p in named if p.requires_grad and no_decay(n, p)]
        counts[group] = {"decay": sum(p.numel() for p in decay), "no_decay": sum(p.numel() for p in plain)}
        lr = group_lr(cfg, group)
        for suffix, params, wd in (("decay", decay, cfg.weight_decay), ("no_decay", plain, 0.0)):
            if params:
                param_groups.append({"params": params, "weight_decay": wd, "lr": lr,
                                     "base_lr": lr, "name": f"{group}/{suffix}"})
    if not param_groups:
        raise ValueError("nothing to train: every parameter is frozen")
    if fused is None:  # the fused AdamW kernel where PyTorch has one (CUDA and CPU)
        fused = all(p.device.type in ("cuda", "cpu") for g in param_groups for p in g["params"])
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
    return opt, counts


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Apply the schedule to every group (each from its own base lr); returns the first group's lr."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, group["base_lr"], cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        lrs.append(group["lr"])
    return lrs[0]
