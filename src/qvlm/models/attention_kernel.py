"""Which ``F.scaled_dot_product_attention`` kernel a training step uses on CPU.

PyTorch's CPU dispatch picks its flash kernel whenever there is no dropout. Its forward is the
fastest at every length, but its backward is slow on short sequences: on the development CPU (2
cores, bf16) a forward + backward took 2.4-3.7x as long as the math kernel's at the demo's shapes
(16-70 tokens) and 1.3x at 128, while at 197-256 tokens flash wins
(``benchmarks/bench_attention_kernel.py``; benchmarks/RESULTS.md, "Attention kernel on CPU"). So
where a gradient flows through attention, sequences up to ``MATH_MAX_LEN`` tokens use the math
kernel on CPU; inference and GPUs keep PyTorch's choice.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_LEN = 128  # longest query or key sequence for which the math kernel wins (CPU, training)


def prefers_math(device: torch.device, max_len: int, needs_grad: bool) -> bool:
    return needs_grad and device.type == "cpu" and max_len <= MATH_MAX_LEN


def training_kernel(device: torch.device, max_len: int, needs_grad: bool = True) -> ContextManager:
    """The math kernel where :func:`prefers_math`, else PyTorch's own choice (a no-op context)."""
    if prefers_math(device, max_len, needs_grad):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the kernel chosen by :func:`training_kernel` from
    the query/key lengths and whether a gradient will flow back through it."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    with training_kernel(q.device, max(q.shape[-2], k.shape[-2]), needs_grad):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
