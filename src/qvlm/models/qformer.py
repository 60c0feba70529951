"""Q-Former: learnable queries that read a frozen image encoder (BLIP-2 paper, §3.1).

A BERT whose input is ``[queries; text]``: every layer has one self-attention shared by both
slices, layers 0, k, 2k, ... add cross-attention from the queries to the image tokens, and the
queries get their own feed-forward (initialised as a copy of BERT's). Which tokens see which is
set by ``mode``: "unimodal" (ITC), "bidirectional" (ITM), "causal" (ITG). Reference
implementations: LAVIS ``lavis/models/blip2_models/Qformer.py`` and HF ``Blip2QFormerModel``.

Attention is ``F.scaled_dot_product_attention``; the image tokens go through the Q-Former's own
LayerNorm (LAVIS's ``ln_vision``) before every cross-attention reads them.

Shape letters: B batch, N image tokens, Q queries, T text tokens, H heads, Dh head width, Dv vision
width, Dq Q-Former width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


MODES = ("unimodal", "bidirectional", "causal")
OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "camembert")  # positions start at pad+1

# The fields a BERT config and transformers' Blip2QFormerConfig share: the Q-Former's shape and init.
BLIP2_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                       "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id",
                       "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
KVCache = list[tuple[Tensor, Tensor]]  # per layer (keys, values) of the query slice, each (B, H, Q, Dh)


@dataclass
class QFormerOutput:
    query: Tensor | None = None  # (B, Q, Dq) last hidden states of the queries
    text: Tensor | None = None  # (B, T, Dq) last hidden states of the text
    query_cache: KVCache | None = None  # only with return_query_cache=True


class Embeddings(nn.Module):
    """BERT text embeddings (word + position + token type 0); queries share only LayerNorm + dropout."""

    def __init__(self, config, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor | None, queries: Tensor | None) -> Tensor:
        parts = [] if queries is None else [queries]  # (B, Q, Dq), no position embedding
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            parts.append(text + self.token_type_embeddings.weight[0])  # (B, T, Dq)
        return self.dropout(self.norm(torch.cat(parts, dim=1)))  # (B, Q+T, Dq)


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LN residual: LayerNorm(x + dropout(dense(attn)))."""

    def __init__(self, dim: int, kv_dim: int, heads: int, attn_dropout: float, dropout: float, eps: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads, self.attn_dropout = heads, attn_dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def forward(self, x: Tensor, mask: Tensor | None = None, past: tuple[Tensor, Tensor] | None = None,
                context: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Self-attention of x (B, L, Dq) after ``past`` keys/values; with ``context`` (B, N, Dv),
        cross-attention of x to it instead."""
        source = x if context is None else context
        q, k, v = self.split(self.query(x)), self.split(self.key(source)), self.split(self.value(source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P+S, Dh)
        p = self.attn_dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, Dh)
        h = h.transpose(1, 2).flatten(2)  # (B, L, Dq)
        return self.norm(x + self.dropout(self.dense(h))), (k, v)


class FeedForward(nn.Module):
    """BERT intermediate + output: LayerNorm(x + dropout(W2 act(W1 x)))."""

    def __init__(self, config, dropout: float):
        super().__init__()
        from transformers.activations import ACT2FN

        act = config.hidden_act
        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class Layer(nn.Module):
    def __init__(self, config, vision_width: int, cross: bool, dropout: float, attn_dropout: float):
        super().__init__()
        dim, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.self_attn = Attention(dim, dim, heads, attn_dropout, dropout, eps)
        self.cross_attn = Attention(dim, vision_width, heads, attn_dropout, dropout, eps) if cross else None
        self.text_ffn = FeedForward(config, dropout)
        self.query_ffn = FeedForward(config, dropout)

    def forward(self, h: Tensor, q_len: int, image: Tensor | None, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """h (B, Q+T, Dq) with the first ``q_len`` rows queries; returns h and the query keys/values."""
        h, (k, v) = self.self_attn(h, mask=mask, past=past)
        query, text = h[:, :q_len], h[:, q_len:]  # (B, Q, Dq), (B, T, Dq)
        if q_len:
            if self.cross_attn is not None and image is not None:
                query, _ = self.cross_attn(query, context=image)  # image (B, N, Dv)
            query = self.query_ffn(query)
        if text.shape[1]:
            text = self.text_ffn(text)
        h = torch.cat([query, text], dim=1) if q_len and text.shape[1] else (query if q_len else text)
        return h, (k[:, :, :q_len], v[:, :, :q_len])


def layout_mask(mode: str, q_len: int, t_len: int, device: torch.device) -> Tensor:
    """(Q+T, Q+T) bool, True where row token may attend to column token (ignoring padding)."""
    allowed = torch.ones(q_len + t_len, q_len + t_len, dtype=torch.bool, device=device)
    if mode == "bidirectional":
        return allowed
    allowed[:q_len, q_len:] = False  # queries never see text
    if mode == "unimodal":
        allowed[q_len:, :q_len] = False  # text never sees queries
    else:  # causal: text sees all queries and text at or before itself
        allowed[q_len:, q_len:] = torch.ones(t_len, t_len, dtype=torch.bool, device=device).tril()
    return allowed


def attention_mask_for(mode: str, q_len: int, t_len: int, text_mask: Tensor | None, batch: int,
                       device: torch.device) -> Tensor | None:
    """(B, 1, Q+T, Q+T) bool SDPA mask: layout and text padding; None when the layout hides nothing
    and there is no text mask. Decided from shapes alone, never from the mask's values: reading them
    would make the host wait for the device (a text mask without padding gives an all-True mask)."""
    full_layout = t_len == 0 or mode == "bidirectional" or (q_len == 0 and mode == "unimodal")
    if full_layout and (text_mask is None or t_len == 0):
        return None  # the queries alone, as in stage 2; or text with no mask
    keys = torch.ones(batch, q_len + t_len, dtype=torch.bool, device=device)
    if text_mask is not None:
        keys[:, q_len:] = text_mask.bool()  # padding is never a key
    allowed = layout_mask(mode, q_len, t_len, device)[None] & keys[:, None, :]  # (B, Q+T, Q+T)
    allowed |= torch.eye(q_len + t_len, dtype=torch.bool, device=device)  # no empty row (NaN in some SDPA kernels)
    return allowed[:, None]


class QFormer(nn.Module):
    """BERT-initialised Q-Former; ``forward`` returns a ``QFormerOutput``.

    ``config`` is a ``BertConfig``-like object; ``dropout`` (None = the config's) sets both the
    hidden and the attention-probability dropout. Build from weights with ``from_source``.
    """

    def __init__(self, config, vision_width: int, num_queries: int = 32, cross_attention_every: int = 2,
                 dropout: float | None = None, cross_attention_qk_gain: float = 0.0, vision_norm_eps: float = 1e-5):
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {config.position_embedding_type}")
        if vision_width < 1 or num_queries < 1 or cross_attention_every < 1:
            raise ValueError("vision_width, num_queries and cross_attention_every must be >= 1")
        hidden = config.hidden_dropout_prob if dropout is None else dropout
        attn = config.attention_probs_dropout_prob if dropout is None else dropout
        self.bert_config, self.vision_width, self.gradient_checkpointing = config, vision_width, False
        self.embeddings = Embeddings(config, hidden)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.hidden_size))  # (1, Q, Dq)
        self.vision_norm = nn.LayerNorm(vision_width, eps=vision_norm_eps)
        self.layers = nn.ModuleList(
            Layer(config, vision_width, i % cross_attention_every == 0, hidden, attn)
            for i in range(config.num_hidden_layers)
        )
        self.apply(self.init_module)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        if cross_attention_qk_gain > 0:
            self.init_cross_attention_qk(cross_attention_qk_gain)

    def init_module(self, module: nn.Module) -> None:
        std = self.bert_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_cross_attention_qk(self, gain: float) -> None:
        """Query and key weights of every cross-attention ~ N(0, (gain / sqrt(fan_in))**2): with unit-scale
        inputs the attention logits start of order gain**2, so the queries begin on distinct image
        tokens instead of BERT-init's near-uniform average (whose small logits also learn slowly)."""
        for layer in self.layers:
            if layer.cross_attn is not None:
                for linear in (layer.cross_attn.query, layer.cross_attn.key):
                    nn.init.normal_(linear.weight, std=gain / linear.in_features ** 0.5)

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[-1]

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def cross_attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    @classmethod
    def from_source(cls, source: str, vision_width: int, num_queries: int = 32, cross_attention_every: int = 2,
                    dropout: float | None = None, seed: int = 0, trust_remote_code: bool = False,
                    cross_attention_qk_gain: float = 0.0, vision_norm_eps: float = 1e-5) -> QFormer:
        """A Q-Former from a BERT source (hub id, dir, pkg:..., random:bert?...); new parts seeded by ``seed``."""
        from transformers import AutoModel

        from qvlm.model_sources import load_model

        bert = load_model(source, AutoModel, seed=seed, trust_remote_code=trust_remote_code)
        if bert.config.model_type in OFFSET_POSITION_MODELS:
            raise ValueError(f"Q-Former source {source!r}: {bert.config.model_type} offsets its positions; use a BERT")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(bert.config, vision_width, num_queries, cross_attention_every, dropout,
                        cross_attention_qk_gain, vision_norm_eps)
        model.load_bert_weights(bert)
        return model

    def bert_weight_map(self) -> dict[str, str]:
        """Our parameter name -> BERT ``state_dict`` name (without a ``bert.`` prefix)."""
        modules = {"embeddings.norm": "embeddings.LayerNorm"}
        for e in ("word", "position", "token_type"):
            modules[f"embeddings.{e}_embeddings"] = f"embeddings.{e}_embeddings"
        for i in range(len(self.layers)):
            ours, theirs = f"layers.{i}", f"encoder.layer.{i}"
            for p in ("query", "key", "value"):
                modules[f"{ours}.self_attn.{p}"] = f"{theirs}.attention.self.{p}"
            modules[f"{ours}.self_attn.dense"] = f"{theirs}.attention.output.dense"
            modules[f"{ours}.self_attn.norm"] = f"{theirs}.attention.output.LayerNorm"
            for ffn in ("text_ffn", "query_ffn"):
                modules[f"{ours}.{ffn}.intermediate"] = f"{theirs}.intermediate.dense"
                modules[f"{ours}.{ffn}.output"] = f"{theirs}.output.dense"
                modules[f"{ours}.{ffn}.norm"] = f"{theirs}.output.LayerNorm"
        return {f"{ours}.{name}": f"{theirs}.{name}" for ours, theirs in modules.items()
                for name, _ in self.get_submodule(ours).named_parameters()}

    def blip2_weight_map(self, text: bool = True) -> dict[str, str]:
        """Our parameter name -> its name in a transformers BLIP-2 checkpoint (``Blip2Model``,
        ``Blip2ForImageTextRetrieval``, ...). BLIP-2's text embeddings have no token types, and its
        image LayerNorm is the vision tower's ``post_layernorm``. ``text=False``: the query path only
        (the text embeddings and text feed-forward are absent from a captioning checkpoint)."""
        modules = {"embeddings.norm": "qformer.layernorm", "vision_norm": "vision_model.post_layernorm"}
        if text:
            modules.update({f"embeddings.{e}_embeddings": f"embeddings.{e}_embeddings" for e in ("word", "position")})
        for i, layer in enumerate(self.layers):
            ours, theirs = f"layers.{i}", f"qformer.encoder.layer.{i}"
            attns = [("self_attn", "attention")] + ([("cross_attn", "crossattention")] if layer.cross_attn else [])
            for attn, hf in attns:
                for p in ("query", "key", "value"):
                    modules[f"{ours}.{attn}.{p}"] = f"{theirs}.{hf}.attention.{p}"
                modules[f"{ours}.{attn}.dense"] = f"{theirs}.{hf}.output.dense"
                modules[f"{ours}.{attn}.norm"] = f"{theirs}.{hf}.output.LayerNorm"
            for ffn, suffix in [("query_ffn", "_query")] + ([("text_ffn", "")] if text else []):
                modules[f"{ours}.{ffn}.intermediate"] = f"{theirs}.intermediate{suffix}.dense"
                modules[f"{ours}.{ffn}.output"] = f"{theirs}.output{suffix}.dense"
                modules[f"{ours}.{ffn}.norm"] = f"{theirs}.output{suffix}.LayerNorm"
        names = {f"{ours}.{name}": f"{theirs}.{name}" for ours, theirs in modules.items()
                 for name, _ in self.get_submodule(ours).named_parameters()}
        return {"query_tokens": "query_tokens", **names}

    @torch.no_grad()
    def load_bert_weights(self, bert_model: nn.Module | Mapping[str, Tensor]) -> list[str]:
        """Copy a BERT's embeddings, self-attention and FFN (into both FFNs); returns fresh param names."""
        state = bert_model.state_dict() if isinstance(bert_model, nn.Module) else dict(bert_model)
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        params = dict(self.named_parameters())
        mapping = self.bert_weight_map()
        for ours, theirs in mapping.items():
            if theirs not in state:
                raise ValueError(f"BERT weights have no {theirs!r} (needed for {ours}); is this a BERT model?")
            if state[theirs].shape != params[ours].shape:
                raise ValueError(f"{theirs}: BERT shape {tuple(state[theirs].shape)} != Q-Former "
                                 f"{ours} shape {tuple(params[ours].shape)}")
            params[ours].copy_(state[theirs])
        return sorted(set(params) - set(mapping))

    def forward(self, image_embeds: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, mode: str = "unimodal", query_cache: KVCache | None = None,
                return_query_cache: bool = False) -> QFormerOutput:
        """image_embeds (B, N, Dv), input_ids/attention_mask (B, T) -> query (B, Q, Dq), text (B, T, Dq)."""
        self.check_inputs(image_embeds, input_ids, attention_mask, mode, query_cache, return_query_cache)
        if query_cache is not None:
            return self.forward_cached(input_ids, attention_mask, query_cache)
        image = None if image_embeds is None else self.vision_norm(image_embeds)  # (B, N, Dv)
        batch = image.shape[0] if image is not None else input_ids.shape[0]
        q_len = 0 if image is None else self.num_queries
        t_len = 0 if input_ids is None else input_ids.shape[1]
        queries = None if image is None else self.query_tokens.expand(batch, -1, -1)  # (B, Q, Dq)
        h = self.embeddings(input_ids, queries)  # (B, Q+T, Dq)
        mask = attention_mask_for(mode, q_len, t_len, attention_mask, batch, h.device)
        h, cache = self.run_layers(h, q_len, image, mask, [None] * len(self.layers))
        return QFormerOutput(query=h[:, :q_len] if q_len else None, text=h[:, q_len:] if t_len else None,
                             query_cache=cache if return_query_cache else None)

    def forward_cached(self, input_ids: Tensor, attention_mask: Tensor | None, query_cache: KVCache) -> QFormerOutput:
        """Causal text attending to cached query keys/values: the text rows of the full causal pass."""
        q_len, (batch, t_len) = query_cache[0][0].shape[2], input_ids.shape
        h = self.embeddings(input_ids, None)  # (B, T, Dq)
        mask = attention_mask_for("causal", q_len, t_len, attention_mask, batch, h.device)[:, :, q_len:]
        h, _ = self.run_layers(h, 0, None, mask, list(query_cache))  # mask (B, 1, T, Q+T)
        return QFormerOutput(text=h)

    def run_layers(self, h: Tensor, q_len: int, image: Tensor | None, mask: Tensor | None,
                   pasts: list) -> tuple[Tensor, KVCache]:
        cache = []
        for layer, past in zip(self.layers, pasts):
            if self.gradient_checkpointing and self.training:
                h, kv = checkpoint(layer, h, q_len, image, mask, past, use_reentrant=False)
            else:
                h, kv = layer(h, q_len, image, mask, past)
            cache.append(kv)
        return h, cache

    def check_inputs(self, image_embeds, input_ids, attention_mask, mode, query_cache, return_query_cache) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if image_embeds is None and input_ids is None:
            raise ValueError("give image_embeds, input_ids, or both")
        if image_embeds is not None and (image_embeds.ndim != 3 or image_embeds.shape[-1] != self.vision_width):
            raise ValueError(f"image_embeds must be (B, N, {self.vision_width}), got {tuple(image_embeds.shape)}")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (B, T) with T >= 1, got {tuple(input_ids.shape)}")
            if input_ids.shape[1] > self.embeddings.position_embeddings.num_embeddings:
                raise ValueError(f"{input_ids.shape[1]} text tokens exceed max_position_embeddings "
                                 f"{self.embeddings.position_embeddings.num_embeddings}")
            if image_embeds is not None and image_embeds.shape[0] != input_ids.shape[0]:
                raise ValueError(f"batch sizes differ: image {image_embeds.shape[0]}, text {input_ids.shape[0]}")
        if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
            raise ValueError("attention_mask needs input_ids of the same (B, T) shape")
        if return_query_cache and image_embeds is None:
            raise ValueError("return_query_cache needs image_embeds (the cache holds the query pass)")
        if query_cache is not None:
            self.check_cache(image_embeds, input_ids, mode, query_cache)

    def check_cache(self, image_embeds, input_ids, mode, query_cache) -> None:
        if mode != "causal":
            raise ValueError(f"query_cache is only valid with mode='causal', got {mode!r}")
        if image_embeds is not None or input_ids is None:
            raise ValueError("with query_cache give input_ids and no image_embeds (the queries are cached)")
        if len(query_cache) != len(self.layers):
            raise ValueError(f"query_cache has {len(query_cache)} layers, the Q-Former {len(self.layers)}")
        if query_cache[0][0].shape[0] != input_ids.shape[0]:
            raise ValueError(f"query_cache batch {query_cache[0][0].shape[0]} != text batch {input_ids.shape[0]}")
