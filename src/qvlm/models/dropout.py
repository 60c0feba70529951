"""Dropout with cheaper masks on CPU: the Q-Former's hidden dropouts (``qformer.Dropout``).

PyTorch's CPU ``bernoulli_`` draws one random double per element, serially: about 5 ns an element
on the development CPU, so with BERT's dropout of 0.1 the masks took 13% of a stage-1 step at the
real shapes (bf16). Here one 64-bit random word (``random_`` over the full int64 range, 0.7 ns per
16 bits) gives four 16-bit uniform integers, and an element is kept where its integer is at or
above a threshold: a drop probability of ``round(p * 65536) / 65536`` (within 7.7e-6 of ``p``),
and the kept elements are scaled by the inverse of that keep probability, so the expectation is
unchanged. The mask is made in the input's dtype, as ``F.dropout`` makes its own. The draws come
from PyTorch's default CPU generator: seeded runs stay reproducible, but the masks differ from
``F.dropout``'s for the same seed. Other devices use ``F.dropout`` (Philox, in fused kernels).
``qvlm bench`` times the Q-Former with each (``cheap_dropout_qformer``, full run). The LLM's LoRA
dropouts (peft's, on every adapted Linear's input) are swapped for this one too
(:func:`swap_lora_dropouts`); ``benchmarks/bench_cheap_dropout.py`` times whole steps both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16  # a mask draw is one 16-bit slice of a 64-bit random word


def drop_probability(p: float) -> float:
    """The probability the cheap CPU mask actually drops with: ``p`` rounded to a multiple of 1/65536."""
    return round(p * LEVELS) / LEVELS


def keep_scale_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(shape) of 0 (dropped) or 1 / (1 - q) (kept), q = ``drop_probability(p)``, in ``dtype``."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniform = words.view(torch.int16)[:n].view(shape)  # each 16-bit slice uniform on [-32768, 32767]
    dropped = round(p * LEVELS)
    keep = uniform >= dropped - LEVELS // 2  # P(keep) = (LEVELS - dropped) / LEVELS
    return keep.to(dtype).mul_(LEVELS / (LEVELS - dropped))


def dropout(x: Tensor, p: float, training: bool, cheap_masks: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, with the cheap mask on CPU (``cheap_masks``) where 0 < p < 1."""
    if not training or p == 0:
        return x
    if not cheap_masks or x.device.type != "cpu" or drop_probability(p) >= 1:
        return F.dropout(x, p, training)
    return x * keep_scale_mask(x.shape, p, x.dtype, x.device)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s cheap CPU masks; ``cheap_masks = False`` gives PyTorch's."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.cheap_masks = p, True

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.cheap_masks)

    def extra_repr(self) -> str:
        return f"p={self.p}, cheap_masks={self.cheap_masks}"


def set_cheap_masks(model: nn.Module, cheap: bool) -> None:
    """Switch every :class:`Dropout` in ``model`` to the cheap CPU masks or to PyTorch's (comparisons)."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.cheap_masks = cheap


def swap_lora_dropouts(model: nn.Module) -> int:
    """Replace peft's LoRA dropouts (``nn.Dropout`` modules in the ``lora_dropout`` ModuleDicts of
    ``model``) by :class:`Dropout` with the same p, in place; returns how many were replaced."""
    swapped = 0
    for name, holder in model.named_modules():
        if name.rsplit(".", 1)[-1] != "lora_dropout" or not isinstance(holder, nn.ModuleDict):
            continue
        for adapter, module in holder.items():
            if type(module) is nn.Dropout:
                holder[adapter] = Dropout(module.p)
                swapped += 1
    return swapped
