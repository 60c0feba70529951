"""Our Q-Former against ``transformers``' ``Blip2QFormerModel`` of the same size, same inputs.

The work timed is the query path with image cross-attention, forward + backward: learnable
queries (B, Q, Dq) read frozen image features (B, N, Dv); the loss is a fixed random projection of
the query outputs. Both sides compute the same function with the same trainable parameters:

- ours: ``QFormer(BertConfig(...), vision_width=Dv, num_queries=Q)`` (its ``vision_norm`` LayerNorm
  on the image features, BLIP-2's ``ln_vision``);
- reference: a trainable ``nn.LayerNorm(Dv)`` on the features (the same norm), then
  ``Blip2QFormerModel(Blip2QFormerConfig(same hidden size / layers / heads / intermediate,
  cross_attention_frequency=2, encoder_hidden_size=Dv, use_qformer_text_input=True))`` fed learnable
  query embeddings, with transformers' SDPA attention (its default).

``use_qformer_text_input=True`` gives the reference the text feed-forward our layers also carry, so
both have the same parameter count apart from our (unused here) text embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qvlm.models.qformer import QFormer


class HFQueryPath(nn.Module):
    """LayerNorm(image) -> Blip2QFormerModel with learnable queries: the reference query path."""

    def __init__(self, hidden: int, layers: int, heads: int, intermediate: int, vision_width: int, queries: int,
                 cross_attention_every: int = 2):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=intermediate, encoder_hidden_size=vision_width,
                                    cross_attention_frequency=cross_attention_every, use_qformer_text_input=True)
        config._attn_implementation = "sdpa"
        self.vision_norm = nn.LayerNorm(vision_width)
        self.query_tokens = nn.Parameter(torch.randn(1, queries, hidden) * config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.attn_implementation = self.qformer.config._attn_implementation

    def forward(self, image_embeds: Tensor) -> Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=self.vision_norm(image_embeds))
        return out.last_hidden_state  # (B, Q, Dq)


def build_pair(hidden: int = 768, layers: int = 12, heads: int = 12, intermediate: int = 3072,
               vision_width: int = 768, queries: int = 32, seed: int = 0) -> dict[str, nn.Module]:
    """{"ours", "hf"}: query-path modules of the same size (train mode, dropout on)."""
    from transformers import BertConfig

    torch.manual_seed(seed)
    bert = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate)
    return {
        "ours": QFormer(bert, vision_width=vision_width, num_queries=queries).train(),
        "hf": HFQueryPath(hidden, layers, heads, intermediate, vision_width, queries).train(),
    }


def comparable_params(module: nn.Module) -> int:
    """Parameters that take part in the query path's definition: all, less our text embeddings."""
    skip = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


def query_outputs(module: nn.Module, image_embeds: Tensor) -> Tensor:
    if isinstance(module, QFormer):
        return module(image_embeds=image_embeds).query  # (B, Q, Dq)
    return module(image_embeds)


def fwd_bwd(module: nn.Module, image_embeds: Tensor, probe: Tensor, autocast) -> None:
    """One forward + backward of the query path; ``probe`` (Q, Dq) makes a non-trivial scalar loss."""
    with autocast:
        out = query_outputs(module, image_embeds)
    (out.float() * probe).sum().backward()
    for p in module.parameters():
        p.grad = None
