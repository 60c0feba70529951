"""Stage-1 heads and the fused ITC + ITM + ITG step of the Q-Former (BLIP-2 §3.2, Fig. 2).

One unimodal pass computes the query outputs and the text [CLS] together: ITC reads both, and
ITG reuses the queries' per-layer keys/values (the query slice is the same in the unimodal and
multimodal-causal layouts), so the image side is never recomputed for ITG. ITM needs the
bidirectional layout and runs its own pass over positives and hard negatives mined from the ITC
similarities; the images' cross-attention keys/values (``QFormer.encode_image``) are projected once
and shared by both passes (only negatives gathered from other ranks are projected again). Gathering
across ranks is injected (``gather``), never called from here. Either choice can be switched off
(``one_pass``, ``reuse_image_kv``; ``train.itc_one_pass``, ``train.itm_reuse_image_kv``): both off
are LAVIS's passes, with the same losses. On CPU both choices measured faster; on an H100 each
measured slower (benchmarks/RESULTS.md), which a rerun is to settle.

Nothing in the step reads a value back from the device (on a GPU each read makes the host wait for
every queued kernel): the hard negatives are drawn with noise made beforehand (``losses._draw``),
copies of a caption are found by comparing token rows (not ``torch.unique``, whose output size is
read back), and the ITG positions come from the data loader (``itg_positions``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm import losses as L
from qvlm.models.qformer import ImageKV, QFormer

Gather = Callable[[Tensor], Tensor]


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


def stage1_losses(qformer: QFormer, heads: Stage1Heads, image_embeds: Tensor, input_ids: Tensor,
                  attention_mask: Tensor, weights: dict[str, float], dec_token_id: int,
                  gather: Gather | None = None, rank: int = 0,
                  generator: torch.Generator | None = None,
                  sum_all: Callable[[Tensor], Tensor] | None = None, itm_fraction: float = 1.0,
                  itg_positions: Tensor | None = None, one_pass: bool = True,
                  reuse_image_kv: bool = True) -> dict[str, Tensor]:
    """Named stage-1 losses (each enabled term, ``loss`` = weighted sum) and accuracies.

    ``itg_positions`` (2, S): ``losses.itg_positions(attention_mask)`` found on the CPU by the
    collator; without them ITG finds its positions on the device (a host-device sync).

    ``one_pass=False``: the queries and the text in two passes instead of one unimodal pass;
    ``reuse_image_kv=False``: ITM projects its pairs' images again instead of gathering the ITC
    pass's keys/values by row. The same losses either way (up to rounding).

    ``itm_fraction`` < 1: ITM on the first ceil(fraction * B) pairs of this process's batch only
    (``itm_step``); ITC and ITG always use the whole batch.

    Across W ranks, ``gather`` concatenates a tensor from every rank and ``sum_all`` sums one;
    with them, the mean over ranks of each loss equals the loss of one process holding the whole
    (concatenated) batch, so averaging gradients over ranks gives the single-process update."""
    use = {k for k, w in weights.items() if w > 0}
    need_text = bool(use & {"itc", "itm"})
    image_kv = qformer.encode_image(image_embeds)  # the image side of cross-attention, once for all passes
    if need_text and not one_pass:  # the queries alone, then the text alone (LAVIS)
        out = qformer(image_kv=image_kv, return_query_cache="itg" in use)
        text = qformer(input_ids=input_ids, attention_mask=attention_mask, mode="unimodal").text
    else:  # queries and text side by side: in the unimodal layout neither sees the other
        out = qformer(image_kv=image_kv, input_ids=input_ids if need_text else None,
                      attention_mask=attention_mask if need_text else None, mode="unimodal",
                      return_query_cache="itg" in use)
        text = out.text
    terms: dict[str, Tensor] = {}
    if need_text:
        image_feats, text_feat = heads.image_feats(out.query), heads.text_feat(text)  # (B,Q,E), (B,E)
        itc = L.itc_loss(image_feats, text_feat, heads.temp,
                         all_image_feats=gather(image_feats) if gather else None,
                         all_text_feat=gather(text_feat) if gather else None, rank=rank)
        terms["itc"], terms["itc_acc"] = itc.loss, (itc.i2t_acc + itc.t2i_acc) / 2
        if "itm" in use:
            itm = itm_step(qformer, heads, image_embeds, input_ids, attention_mask, itc, gather, rank, generator,
                           image_kv=image_kv if reuse_image_kv else None, fraction=itm_fraction)
            terms["itm"], terms["itm_acc"] = itm.loss, itm.acc
    if "itg" in use:
        ids = decoder_input_ids(input_ids, dec_token_id)
        text = qformer(input_ids=ids, attention_mask=attention_mask, query_cache=out.query_cache,
                       mode="causal").text  # (B, T, Dq)
        itg = L.itg_loss_from_hidden(text, heads.lm_head, ids, attention_mask, itg_positions)  # LM head on caption tokens only
        terms["itg"] = itg.loss if sum_all is None else global_token_mean(itg.loss, itg.tokens, sum_all)
    return L.combine(terms, {k: w for k, w in weights.items() if k in use})


def itm_step(qformer: QFormer, heads: Stage1Heads, image_embeds: Tensor, input_ids: Tensor,
             attention_mask: Tensor, itc, gather: Gather | None, rank: int,
             generator: torch.Generator | None, image_kv: ImageKV | None = None, fraction: float = 1.0):
    """ITM on B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs;
    with ``fraction`` < 1 on the first k = ceil(fraction * B) positives and their negatives (3k pairs).

    ``image_kv``: this rank's images already encoded (``QFormer.encode_image``), gathered here by
    row; without it the pairs' images are encoded here."""
    b = image_embeds.shape[0]
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
    mine = slice(rank * b, rank * b + k)  # negatives are drawn for every row, whatever k: the same draws
    neg_text, neg_image = negatives.text_idx[mine], negatives.image_idx[mine]
    own = torch.arange(k, device=image_embeds.device)
    input_ids, attention_mask = input_ids[:k], attention_mask[:k]
    if image_kv is None:  # images [i, i, neg(i)] projected again: (3k, N, Dv) -> (3k, H, N, Dh) per layer
        pair_kv = qformer.encode_image(torch.cat([image_embeds[:k], image_embeds[:k], all_images[neg_image]]))
    elif gather is None:  # one process: the negative images are ours too
        pair_kv = image_kv.select(torch.cat([own, own, neg_image]))  # images [i, i, neg(i)]: (3k, H, N, Dh)
    else:
        pair_kv = ImageKV.cat([image_kv.select(torch.cat([own, own])), qformer.encode_image(all_images[neg_image])])
    ids = torch.cat([input_ids, all_ids[neg_text], input_ids])  # (3k, T)
    mask = torch.cat([attention_mask, all_mask[neg_text], attention_mask])
    query = qformer(image_kv=pair_kv, input_ids=ids, attention_mask=mask, mode="bidirectional").query
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
