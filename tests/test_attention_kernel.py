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


def test_cpu_training_attention_keeps_bf16_in_its_precision_and_upcast_math_restores_pytorchs_default():
    from qvlm.models.attention_kernel import training_kernel, upcast_math

    flag = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed
    assert not flag()  # PyTorch's default, outside our contexts
    with training_kernel(CPU, MATH_MAX_LEN + 69):  # longer: PyTorch's kernel choice, but the flag is on
        assert flag()
    with upcast_math(), training_kernel(CPU, 16):
        assert not flag()
    with torch.no_grad(), training_kernel(CPU, 16, needs_grad=False):
        assert not flag()
    assert not flag()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 24, 16, generator=gen) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    ours = sdpa(q, k, v)
    ours.float().sum().backward()
    assert ours.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    with upcast_math():
        upcast = sdpa(q, k, v)
    assert not torch.equal(ours, upcast)  # the flag took: the math kernel ran in bf16, not fp32
    assert (ours.float() - exact).abs().max() < 0.02 and (upcast.float() - exact).abs().max() < 0.02
