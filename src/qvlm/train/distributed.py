"""Everything that talks to torch.distributed lives here; models and losses receive plain callables.

``all_gather_with_grad`` concatenates a tensor from every rank along dim 0; gradients flow back
to the local slice (the other ranks' slices are constants here and get their gradients on their
own rank), which is what ITC over the global batch needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touched every slice: sum them
        size = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * size : (dist.get_rank() + 1) * size]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...) everywhere, differentiable w.r.t. the local part."""
    if not is_distributed():
        return tensor
    if not tensor.requires_grad:
        return all_gather_no_grad(tensor)
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_fn():
    """The gather callable the stage-1 step takes (None when running in one process)."""
    return all_gather_with_grad if is_distributed() else None
