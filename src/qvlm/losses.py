"""Stage-1 and stage-2 losses as pure tensor functions (BLIP-2 paper, §3.2).

Stage 1 trains the Q-Former with three objectives that share one pass of the queries over the
frozen image features:

- ITC, image-text contrastive: each query output and the text [CLS] are projected to a shared
  space and L2-normalised; the image-text similarity is the max over queries; InfoNCE in both
  directions with a learnable temperature.
- ITM, image-text matching: a 2-way head on every query output (bidirectional attention with the
  text), averaged over queries; one hard negative text per image and one hard negative image per
  text, sampled in proportion to the ITC similarity.
- ITG, image-grounded text generation: next-token loss on the caption, whose first token is the
  decoder-start token that replaced [CLS].

Stage 2 uses the plain shifted causal-LM loss (``lm_loss``). ``combine`` weights any subset.

Unlike LAVIS, which calls ``torch.distributed`` inside the model's forward, nothing here knows
about processes: the caller gathers features across ranks (with gradients, see
``train/distributed.py``) and passes them in together with its rank, so every function runs on one
CPU and is unit-tested with hand-computed values.

Shape letters: B local batch, W world size, Q queries, E shared ITC width, T text tokens,
V vocabulary, N rows of the ITM batch (3B in the BLIP-2 layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ITC_TEMP_INIT = 0.07  # BLIP-2 / CLIP initial temperature
TEMP_MIN, TEMP_MAX = 0.001, 0.5
IGNORE_INDEX = -100  # label that cross_entropy skips


@dataclass
class ItcOutput:
    loss: Tensor  # () mean of the i2t and t2i cross-entropies
    sim_i2t: Tensor  # (B, B*W) fp32 local images vs all texts, / temperature, detached
    sim_t2i: Tensor  # (B, B*W) fp32 local texts vs all images, / temperature, detached
    targets: Tensor  # (B,) column of each row's positive: rank * B + arange(B)
    i2t_acc: Tensor  # () fraction of images whose top text is the positive
    t2i_acc: Tensor  # () fraction of texts whose top image is the positive


class HardNegatives(NamedTuple):
    text_idx: Tensor  # (B,) for each local image, a column of sim_i2t (a text of the gathered batch)
    image_idx: Tensor  # (B,) for each local text, a column of sim_t2i (an image of the gathered batch)


@dataclass
class ItmOutput:
    loss: Tensor  # () cross-entropy over match / no-match
    acc: Tensor  # () fraction of pairs classified correctly


@dataclass
class ItgOutput:
    loss: Tensor  # () mean next-token cross-entropy over supervised caption tokens
    tokens: Tensor  # () number of supervised tokens


@dataclass
class LmOutput:
    loss: Tensor  # () mean next-token cross-entropy over labels != -100
    tokens: Tensor  # () number of supervised tokens


# --------------------------------------------------------------------------------------------- ITC


def clamp_temperature(temp: Tensor, min: float = TEMP_MIN, max: float = TEMP_MAX) -> Tensor:
    """Clamp the learnable temperature in place (no autograd record) and return it.

    BLIP-2 keeps ``temp`` itself (not its log) as the parameter; the trainer calls this after every
    optimizer step so the parameter never leaves [min, max]. ``itc_loss`` also clamps its input
    out of place, so a value that drifted between steps cannot blow up the logits.
    """
    with torch.no_grad():
        temp.clamp_(min, max)
    return temp


def itc_loss(
    image_feats: Tensor,
    text_feat: Tensor,
    temperature: Tensor | float,
    label_smoothing: float = 0.0,
    all_image_feats: Tensor | None = None,
    all_text_feat: Tensor | None = None,
    rank: int = 0,
) -> ItcOutput:
    """Image-text contrastive loss with max-over-queries similarity.

    image_feats (B, Q, E) projected query outputs and text_feat (B, E) the projected text [CLS];
    both are L2-normalised here. Negatives come from the whole batch: pass ``all_image_feats``
    (B*W, Q, E) and ``all_text_feat`` (B*W, E) gathered across W ranks (with gradients) and this
    process's ``rank``; without them the local batch is the whole batch.
    """
    if (all_image_feats is None) != (all_text_feat is None):
        raise ValueError("pass both all_image_feats and all_text_feat, or neither")
    if all_image_feats is None:
        all_image_feats, all_text_feat = image_feats, text_feat
        rank = 0
    b, total = image_feats.shape[0], all_image_feats.shape[0]
    if text_feat.shape[0] != b or all_text_feat.shape[0] != total:
        raise ValueError(f"batch sizes differ: images {b}/{total}, texts {text_feat.shape[0]}/"
                         f"{all_text_feat.shape[0]} (local/gathered)")
    if rank < 0 or (rank + 1) * b > total:
        raise ValueError(f"rank {rank} with local batch {b} does not fit a gathered batch of {total}")

    image_feats, all_image_feats = F.normalize(image_feats, dim=-1), F.normalize(all_image_feats, dim=-1)
    text_feat, all_text_feat = F.normalize(text_feat, dim=-1), F.normalize(all_text_feat, dim=-1)
    temp = torch.as_tensor(temperature, device=image_feats.device).float().clamp(TEMP_MIN, TEMP_MAX)

    # logits reach 1/TEMP_MIN = 1000, too coarse in bf16: the (B, B*W) similarities are divided in fp32
    # (B, Q, E) x (B*W, E) -> (B, B*W, Q) -> max over queries -> (B, B*W)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, all_text_feat).amax(dim=-1).float() / temp
    # (B, E) x (B*W, Q, E) -> (B, B*W, Q) -> max over queries -> (B, B*W)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, all_image_feats).amax(dim=-1).float() / temp

    targets = rank * b + torch.arange(b, device=image_feats.device)  # (B,)
    loss_i2t = F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    with torch.no_grad():
        i2t_acc = (sim_i2t.argmax(dim=1) == targets).float().mean()
        t2i_acc = (sim_t2i.argmax(dim=1) == targets).float().mean()
    return ItcOutput(loss=(loss_i2t + loss_t2i) / 2, sim_i2t=sim_i2t.detach(), sim_t2i=sim_t2i.detach(),
                     targets=targets, i2t_acc=i2t_acc, t2i_acc=t2i_acc)


# --------------------------------------------------------------------------------------------- ITM


def _negative_weights(sim: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """(B, C) sampling weights ∝ softmax(sim) over each row's non-positive columns, never all zero.

    ``exclude`` (B, C) bool marks more columns that must not be drawn (pairs known to match) unless
    a row has no other column left. NaN similarities get weight 0; if a row has +inf entries they
    share all the mass (the limit of softmax); a row whose weights are all zero (e.g. all -inf)
    falls back to uniform.
    """
    s = sim.detach().float().nan_to_num(nan=-math.inf)
    negative = torch.ones_like(s, dtype=torch.bool)
    negative[torch.arange(s.shape[0], device=s.device), targets] = False
    if exclude is not None:
        allowed = negative & ~exclude
        negative = torch.where(allowed.any(dim=1, keepdim=True), allowed, negative)
    s = s.masked_fill(~negative, -math.inf)
    top = s.amax(dim=1, keepdim=True)  # (B, 1), may be +inf or -inf
    weights = torch.where(top.isposinf(), s.isposinf().float(), torch.exp(s - top))
    weights = weights.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) * negative
    empty = weights.sum(dim=1, keepdim=True) <= 0  # (B, 1)
    return torch.where(empty, negative.float(), weights)


def sample_hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, targets: Tensor, generator: torch.Generator | None = None,
    same: Tensor | None = None,
) -> HardNegatives:
    """For each image one hard-negative text and for each text one hard-negative image.

    sim_i2t and sim_t2i (B, C) are ``ItcOutput`` similarities (already divided by the
    temperature), targets (B,) the positive columns. A negative is drawn with probability
    ∝ softmax(sim) over the other C - 1 columns, so it is never the positive. ``same`` (B, C) bool
    marks pairs that also match (e.g. another copy of the same caption, the same image): they are
    not drawn while a row has anything else, so ITM is not taught that a match is a mismatch.
    Indices are columns, i.e. rows of the gathered batch; sampling is deterministic given ``generator``.
    """
    if sim_i2t.shape != sim_t2i.shape or sim_i2t.dim() != 2 or targets.shape != sim_i2t.shape[:1]:
        raise ValueError(f"expected sims (B, C) and targets (B,), got {tuple(sim_i2t.shape)}, "
                         f"{tuple(sim_t2i.shape)}, {tuple(targets.shape)}")
    if sim_i2t.shape[1] < 2:
        raise ValueError("hard negatives need at least 2 image-text pairs in the (gathered) batch")
    text_idx = _draw(_negative_weights(sim_i2t, targets, same), generator)
    image_idx = _draw(_negative_weights(sim_t2i, targets, same), generator)
    return HardNegatives(text_idx=text_idx, image_idx=image_idx)


def _draw(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row, ∝ ``weights`` (B, C) -> (B,) on the weights' device, by the Gumbel-max
    trick: the argmax of log(weights) + G, G standard Gumbel noise, is column j with probability
    weights[j] / sum(weights). The noise is drawn where ``generator`` lives (a CPU generator with CUDA
    weights: on the CPU, then copied without waiting) and depends on nothing the device computed, so
    the draw never makes the host wait for the device, and it is the same on every device for the
    same generator state."""
    where = generator.device if generator is not None else weights.device
    u = torch.rand(weights.shape, generator=generator, device=where, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float64).tiny))).float()  # (B, C)
    if gumbel.device != weights.device:
        if weights.device.type == "cuda":
            gumbel = gumbel.pin_memory()  # page-locked: the copy below queues instead of waiting
        gumbel = gumbel.to(weights.device, non_blocking=True)
    return (weights.float().log() + gumbel).argmax(dim=1)  # weight 0: log = -inf, never drawn


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """(3B,) BLIP-2 layout: B positive pairs (1), B (image, negative text), B (negative image, text) (0)."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def itm_logits_from_queries(head_logits: Tensor) -> Tensor:
    """(N, Q, 2) the 2-way head applied to every query output -> (N, 2) averaged over queries."""
    return head_logits.mean(dim=1)


def itm_loss(logits: Tensor, labels: Tensor) -> ItmOutput:
    """Match / no-match cross-entropy on logits (N, 2) and labels (N,) (see ``itm_labels``)."""
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        acc = (logits.argmax(dim=1) == labels).float().mean()
    return ItmOutput(loss=loss, acc=acc)


# ------------------------------------------------------------------------------------- ITG and LM


def _next_token_ce(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Position t predicts labels[t + 1]: logits[:, :-1] (B, T-1, V) against labels[:, 1:] (B, T-1)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    _, tokens = supervised_positions(labels)
    targets = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),  # (B*(T-1), V), (B*(T-1),)
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    return loss, tokens


def itg_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor,
             label_smoothing: float = 0.0) -> ItgOutput:
    """Caption loss: logits (B, T, V) at t predict input_ids (B, T) at t + 1; padding
    (attention_mask == 0) is ignored and the first token (decoder start) is never a target."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
    loss, tokens = _next_token_ce(logits, labels, label_smoothing)
    return ItgOutput(loss=loss, tokens=tokens)


def itg_loss_from_hidden(hidden: Tensor, head: Callable[[Tensor], Tensor], input_ids: Tensor,
                         attention_mask: Tensor, positions: Tensor | None = None) -> ItgOutput:
    """``itg_loss(head(hidden), input_ids, attention_mask)`` with ``head`` (the vocabulary
    projection) run only on the positions that predict a caption token (``lm_loss_from_hidden``);
    ``positions`` (2, S): their rows and columns when known beforehand (``itg_positions``)."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
    out = lm_loss_from_hidden(hidden, head, labels, positions)
    return ItgOutput(loss=out.loss, tokens=out.tokens)


def lm_loss_from_hidden(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                        positions: Tensor | None = None) -> LmOutput:
    """``lm_loss(head(hidden), labels)`` with ``head`` (the vocabulary projection) run only on the
    S positions that have a label: hidden (B, T, D) -> (S, V) logits instead of (B, T, V). With a
    large vocabulary the logits of the prompt, the padding and the last position are most of the
    head's cost and memory. ``positions`` (2, S): those positions' rows and columns (position t
    predicts token t + 1), when known beforehand: then nothing here waits for the device."""
    if positions is None:  # found here, on the device
        supervised, tokens = supervised_positions(labels)
        positions = supervised.nonzero().T  # (2, S)
    elif positions.shape[1] == 0:  # counted on the host
        raise ValueError("batch has no supervised tokens")
    else:
        tokens = torch.full((), positions.shape[1], dtype=torch.long, device=labels.device)
    rows, cols = positions
    logits = head(hidden[rows, cols])  # (S, V)
    return LmOutput(loss=F.cross_entropy(logits.float(), labels[rows, cols + 1]), tokens=tokens)


def itg_positions(attention_mask: Tensor) -> Tensor:
    """(2, S) rows and columns of the positions that predict a caption token under ``itg_loss``
    (position t predicts token t + 1, which is not padding). A data loader finds them on the CPU
    and hands them to the step, which then gathers by index without waiting for the device."""
    return (attention_mask[:, 1:] != 0).nonzero().T.contiguous()


def supervised_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T-1) mask of the positions whose next token has a label (position t predicts token
    t + 1), and their count; no such position is an error."""
    supervised = labels[:, 1:] != IGNORE_INDEX
    tokens = supervised.sum()
    if tokens.item() == 0:
        raise ValueError("batch has no supervised tokens")
    return supervised, tokens


def distill_loss_from_hidden(hidden: Tensor, teacher_hidden: Tensor, head: Callable[[Tensor], Tensor],
                             labels: Tensor) -> LmOutput:
    """KL(teacher || student) of the next-token distributions, token mean over the positions that
    ``lm_loss_from_hidden`` supervises: the whole distribution, not only the label token, so a
    student held to a teacher keeps its near-ties too. hidden, teacher_hidden (B, T, D)."""
    supervised, tokens = supervised_positions(labels)
    student = F.log_softmax(head(hidden[:, :-1][supervised]).float(), dim=-1)  # (S, V)
    with torch.no_grad():
        teacher = F.log_softmax(head(teacher_hidden[:, :-1][supervised]).float(), dim=-1)  # (S, V)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / tokens
    return LmOutput(loss=kl, tokens=tokens)


def lm_loss(logits: Tensor, labels: Tensor) -> LmOutput:
    """Shifted causal-LM loss: logits (B, T, V) at t predict labels (B, T) at t + 1; -100 ignored."""
    loss, tokens = _next_token_ce(logits, labels)
    return LmOutput(loss=loss, tokens=tokens)


# ----------------------------------------------------------------------------------------- combine


def combine(losses: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """Every term of ``losses`` plus ``loss`` = sum of weight * term over terms with weight > 0.

    A term whose weight is 0 is reported but not trained on; a positive weight for a term that was
    not computed is an error, as is a negative weight or no enabled term at all.
    """
    if "loss" in losses:
        raise ValueError("'loss' is reserved for the weighted sum; name the terms differently")
    negative = sorted(name for name, w in weights.items() if w < 0)
    if negative:
        raise ValueError(f"negative loss weights: {negative}")
    enabled = {name: w for name, w in weights.items() if w > 0}
    if not enabled:
        raise ValueError(f"no loss term has a positive weight: {weights}")
    missing = sorted(set(enabled) - set(losses))
    if missing:
        raise ValueError(f"loss terms {missing} have positive weights but were not computed "
                       f"(computed: {sorted(losses)})")
    total = sum(w * losses[name] for name, w in enabled.items())
    return {**losses, "loss": total}
