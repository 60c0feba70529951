"""Projector: an MLP from the Q-Former width to the LLM width, (B, Q, Dq) -> (B, Q, Dlm).

BLIP-2 §3.2 uses one fully-connected layer; the article (and LLaVA-1.5) use a small MLP. ``depth``
counts the Linear layers, so depth 1 is BLIP-2's linear map and depth 2 is the article's MLP.
"""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int = 0,
                 activation: str = "gelu"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"projector activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, query_states: Tensor) -> Tensor:
        if query_states.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects width {self.in_dim}, got {tuple(query_states.shape)}")
        return self.net(query_states)  # (B, Q, Dq) -> (B, Q, Dlm)
