"""Stage-1 heads and the ITC + ITM + ITG losses of the Q-Former (BLIP-2 §3.2, Fig. 2), with
LAVIS's passes (``lavis/models/blip2_models/blip2_qformer.py``):

- ITC: the queries alone read the image (unimodal), the text alone makes its [CLS];
- ITM: one bidirectional pass over positives and hard negatives mined from the ITC similarities;
- ITG: the caption, causally masked, attends to the query pass's cached keys/values.

Gathering across ranks is injected (``Ranks``), never called from here. Nothing reads a value back
from the device: the hard negatives are drawn with noise made beforehand (``losses._draw``), copies
of a caption are found by comparing token rows, and the ITG positions can come from the data loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm import losses as L
from qvlm.models.qformer import QFormer

Gather = Callable[[Tensor], Tensor]


@dataclass
class Ranks:
    """Cross-rank operations (``qvlm.distributed``): ``gather`` concatenates a tensor from every
    rank, ``sum_all`` sums one. With them the mean over ranks of each loss equals the loss of one
    process holding the whole (concatenated) batch. The defaults are one process."""

    gather: Gather | None = None
    sum_all: Callable[[Tensor], Tensor] | None = None
    rank: int = 0


class LMHead(nn.Module):
    """BERT-style prediction head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        dim = word_embeddings.embedding_dim
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.word_embeddings = word_embeddings  # shared, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))  # (B, T, Dq)
        return F.linear(h, self.word_embeddings.weight, self.bias)  # (B, T, V)


class Stage1Heads(nn.Module):
    """ITC projections + temperature, the ITM 2-way head, and the ITG language-model head."""

    def __init__(self, qformer: QFormer, embed_dim: int = 256):
        super().__init__()
        dim = qformer.hidden_size
        self.vision_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.itm_head = nn.Linear(dim, 2)
        self.lm_head = LMHead(qformer.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(L.ITC_TEMP_INIT))

    def image_feats(self, query: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(query), dim=-1)  # (B, Q, Dq) -> (B, Q, E)

    def text_feat(self, text: Tensor) -> Tensor:
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)  # [CLS]: (B, T, Dq) -> (B, E)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.copy_(L.clamp_temperature(self.temp))


def decoder_input_ids(input_ids: Tensor, dec_token_id: int) -> Tensor:
    """ITG input: the decoder-start token replaces [CLS] at position 0."""
    ids = input_ids.clone()
    ids[:, 0] = dec_token_id
    return ids


def stage1_losses(qformer: QFormer, heads: Stage1Heads, image_embeds: Tensor, batch: dict[str, Tensor],
                  weights: dict[str, float], dec_token_id: int, ranks: Ranks | None = None,
                  generator: torch.Generator | None = None, itm_fraction: float = 1.0) -> dict[str, Tensor]:
    """Named stage-1 losses (each enabled term, ``loss`` = weighted sum) and accuracies.

    ``batch``: ``input_ids`` and ``attention_mask`` (B, T) of the captions, and optionally
    ``itg_positions`` (2, S) (``losses.itg_positions``, found on the CPU by the collator).
    ``itm_fraction`` < 1: ITM on the first ceil(fraction * B) pairs of this process's batch only;
    ITC and ITG always use the whole batch."""
    ranks = ranks or Ranks()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    use = {k for k, w in weights.items() if w > 0}
    query = qformer(image_embeds=image_embeds, return_query_cache="itg" in use)  # queries alone
    terms: dict[str, Tensor] = {}
    if use & {"itc", "itm"}:
        text = qformer(input_ids=ids, attention_mask=mask, mode="unimodal").text  # text alone
        image_feats, text_feat = heads.image_feats(query.query), heads.text_feat(text)  # (B,Q,E), (B,E)
        gather = ranks.gather
        itc = L.itc_loss(image_feats, text_feat, heads.temp,
                         all_image_feats=gather(image_feats) if gather else None,
                         all_text_feat=gather(text_feat) if gather else None, rank=ranks.rank)
        terms["itc"], terms["itc_acc"] = itc.loss, (itc.i2t_acc + itc.t2i_acc) / 2
        if "itm" in use:
            itm = itm_step(qformer, heads, image_embeds, ids, mask, itc, ranks, generator, itm_fraction)
            terms["itm"], terms["itm_acc"] = itm.loss, itm.acc
    if "itg" in use:
        dec_ids = decoder_input_ids(ids, dec_token_id)
        text = qformer(input_ids=dec_ids, attention_mask=mask, query_cache=query.query_cache,
                       mode="causal").text  # (B, T, Dq)
        itg = L.itg_loss_from_hidden(text, heads.lm_head, dec_ids, mask, batch.get("itg_positions"))
        terms["itg"] = itg.loss if ranks.sum_all is None else global_token_mean(itg.loss, itg.tokens, ranks.sum_all)
    return L.combine(terms, {k: w for k, w in weights.items() if k in use})


def itm_step(qformer: QFormer, heads: Stage1Heads, image_embeds: Tensor, input_ids: Tensor,
             attention_mask: Tensor, itc, ranks: Ranks, generator: torch.Generator | None, fraction: float = 1.0):
    """ITM on B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs;
    with ``fraction`` < 1 on the first k = ceil(fraction * B) positives and their negatives (3k pairs)."""
    b, gather = image_embeds.shape[0], ranks.gather
    k = max(1, math.ceil(fraction * b))  # b when fraction is 1
    all_images = gather(image_embeds) if gather else image_embeds  # (B*W, N, Dv)
    all_ids = gather(input_ids) if gather else input_ids  # (B*W, T*): padded to the longest rank
    all_mask = gather(attention_mask) if gather else attention_mask
    input_ids, attention_mask = pad_to(input_ids, all_ids.shape[1]), pad_to(attention_mask, all_ids.shape[1])
    # Negatives are drawn for the whole gathered batch with the same generator on every rank, then
    # each rank keeps its rows: the same pairs as one process holding the whole batch would draw.
    sim_i2t = gather(itc.sim_i2t) if gather else itc.sim_i2t  # (B*W, B*W)
    sim_t2i = gather(itc.sim_t2i) if gather else itc.sim_t2i
    targets = torch.arange(sim_i2t.shape[0], device=image_embeds.device)
    # Captions repeat (several images can share one): a copy of the positive caption is no negative.
    same = same_rows(all_ids * all_mask)  # (B*W, B*W)
    negatives = L.sample_hard_negatives(sim_i2t, sim_t2i, targets, generator=generator, same=same)
    mine = slice(ranks.rank * b, ranks.rank * b + k)  # negatives are drawn for every row, whatever k
    neg_text, neg_image = negatives.text_idx[mine], negatives.image_idx[mine]
    images = torch.cat([image_embeds[:k], image_embeds[:k], all_images[neg_image]])  # (3k, N, Dv)
    ids = torch.cat([input_ids[:k], all_ids[neg_text], input_ids[:k]])  # (3k, T)
    mask = torch.cat([attention_mask[:k], all_mask[neg_text], attention_mask[:k]])
    query = qformer(image_embeds=images, input_ids=ids, attention_mask=mask, mode="bidirectional").query
    logits = L.itm_logits_from_queries(heads.itm_head(query))  # (3k, Q, 2) -> (3k, 2)
    return L.itm_loss(logits, L.itm_labels(k, logits.device))


def same_rows(tokens: Tensor, budget: int = 1 << 26) -> Tensor:
    """(R, R) bool, True where row i of ``tokens`` (R, T) equals row j. Compared on the device in
    column chunks of at most ``budget`` elements, with no read-back (``torch.unique`` would read the
    number of distinct rows back from the device)."""
    r, t = tokens.shape
    step = max(1, budget // max(1, r * r))
    same = torch.ones(r, r, dtype=torch.bool, device=tokens.device)
    for start in range(0, t, step):
        chunk = tokens[:, start:start + step]  # (R, t')
        same &= (chunk[:, None, :] == chunk[None, :, :]).all(dim=-1)
    return same


def pad_to(tokens: Tensor, length: int) -> Tensor:
    """Right-pad (B, T) ids or mask with 0 ([PAD] / masked out) to (B, length)."""
    return F.pad(tokens, (0, length - tokens.shape[1])) if length > tokens.shape[1] else tokens


def global_token_mean(local_mean: Tensor, tokens: Tensor, sum_all: Callable[[Tensor], Tensor]) -> Tensor:
    """A per-rank token-mean loss rescaled so that its mean over W ranks is the token mean of the
    whole batch: local_mean * tokens * W / all tokens (the counts carry no gradient)."""
    counts = torch.stack([tokens.float(), torch.ones_like(tokens, dtype=torch.float)])
    total, world = sum_all(counts).unbind()
    return local_mean * tokens.float() * world / total


@torch.no_grad()
def itm_match_prob(qformer: QFormer, heads: Stage1Heads, image_embeds: Tensor, input_ids: Tensor,
                   attention_mask: Tensor) -> Tensor:
    """P(match) for each (image_i, text_i) pair: (B,)."""
    query = qformer(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                    mode="bidirectional").query
    logits = L.itm_logits_from_queries(heads.itm_head(query))  # (B, 2)
    return logits.softmax(dim=-1)[:, 1]
