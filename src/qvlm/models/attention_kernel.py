"""Which ``F.scaled_dot_product_attention`` kernel a training step uses on CPU.

PyTorch's CPU dispatch picks its flash kernel whenever there is no dropout. Its forward is the
fastest at every length, but its backward is slow on short sequences: on the development CPU (2
cores, bf16) a forward + backward took 2.4-3.7x as long as the math kernel's at the demo's shapes
(16-70 tokens) and 1.3x at 128, while at 197-256 tokens flash wins
(``benchmarks/bench_attention_kernel.py``; benchmarks/RESULTS.md, "Attention kernel on CPU"). So
where a gradient flows through attention, sequences up to ``MATH_MAX_LEN`` tokens use the math
kernel on CPU; inference and GPUs keep PyTorch's choice.

PyTorch's math kernel computes bf16 and fp16 attention in fp32 unless told otherwise (it casts
q, k and v up, and its matmuls then miss the CPU's bf16 units). Every CPU attention a gradient flows
through (the short sequences above, and longer ones with dropout, where PyTorch picks the math
kernel itself) runs it in the inputs' precision instead: products accumulated in fp32 by the GEMMs,
softmax computed in fp32, probabilities rounded to bf16 for the product with the values, as eager
attention under autocast and GPU flash kernels do. The Q-Former forward + backward at the real
shapes (bf16, batch 8, dropout 0.1) got 1.08x faster (``qvlm bench``: ``bf16_math_attention_qformer``).
:func:`upcast_math` restores PyTorch's default, for comparisons.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_LEN = 128  # longest query or key sequence for which the math kernel wins (CPU, training)


def prefers_math(device: torch.device, max_len: int, needs_grad: bool) -> bool:
    return needs_grad and device.type == "cpu" and max_len <= MATH_MAX_LEN


_math_in_input_precision = True  # what a CPU training attention does (``upcast_math`` turns it off)


@contextlib.contextmanager
def upcast_math():
    """Within: the math kernel computes bf16/fp16 attention in fp32, PyTorch's default (benchmarks, tests)."""
    global _math_in_input_precision
    before, _math_in_input_precision = _math_in_input_precision, False
    try:
        yield
    finally:
        _math_in_input_precision = before


@contextlib.contextmanager
def math_in_input_precision(allowed: bool):
    """Within: whether the math kernel may keep bf16/fp16 inputs in their precision (a process-wide
    PyTorch flag, set back on exit; ``torch.backends.cuda``'s name, but it governs every device)."""
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)


@contextlib.contextmanager
def _cpu_training_kernel(math_only: bool):
    with math_in_input_precision(_math_in_input_precision):
        with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
            yield


def training_kernel(device: torch.device, max_len: int, needs_grad: bool = True) -> ContextManager:
    """On CPU when a gradient flows: the math kernel where :func:`prefers_math`, else PyTorch's
    choice, with the math kernel in the inputs' precision either way. Elsewhere a no-op context."""
    if not (needs_grad and device.type == "cpu"):
        return contextlib.nullcontext()
    math_only = prefers_math(device, max_len, needs_grad)
    if torch.compiler.is_compiling():  # traced (train.compile): the kernel choice only, the flag untouched
        return sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext()
    return _cpu_training_kernel(math_only)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the kernel chosen by :func:`training_kernel` from
    the query/key lengths and whether a gradient will flow back through it."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    with training_kernel(q.device, max(q.shape[-2], k.shape[-2]), needs_grad):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
