"""The CPU attention kernel choice: math for short sequences when a gradient flows, else PyTorch's
own (flash on CPU); values and gradients are the same either way."""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qvlm.models.attention_kernel import MATH_MAX_LEN, prefers_math, sdpa

CPU = torch.device("cpu")


def ops_of(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def qkv(length: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, length, 8, generator=gen).requires_grad_(grad) for _ in range(3)]


def test_rule():
    assert prefers_math(CPU, MATH_MAX_LEN, needs_grad=True)
    assert not prefers_math(CPU, MATH_MAX_LEN + 1, needs_grad=True)
    assert not prefers_math(CPU, 16, needs_grad=False)
    assert not prefers_math(torch.device("cuda"), 16, needs_grad=True)


def test_short_training_attention_runs_the_math_kernel_and_inference_keeps_flash():
    q, k, v = qkv(16, grad=True)
    assert "aten::_scaled_dot_product_attention_math" in ops_of(lambda: sdpa(q, k, v))
    with torch.no_grad():
        ops = ops_of(lambda: sdpa(q, k, v))
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert any("flash" in name for name in ops)
    long_q, long_k, long_v = qkv(MATH_MAX_LEN + 8, grad=True)
    assert "aten::_scaled_dot_product_attention_math" not in ops_of(lambda: sdpa(long_q, long_k, long_v))


def test_same_values_and_gradients_as_the_default_kernel():
    q, k, v = qkv(16, grad=True)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    ours = sdpa(q, k, v, attn_mask=mask)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref.square().sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert all(torch.allclose(g, t.grad, atol=1e-5) for g, t in zip(grads, (q, k, v)))
