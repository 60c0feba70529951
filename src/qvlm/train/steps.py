"""The loss of one micro-batch for each stage, as named terms (``loss`` is what gets back-propagated).

Stage 1 uses the ITC/ITM/ITG weights of ``train.losses``; stage 2 uses its ``lm`` weight (1 when
absent) and, with text replay on, its ``replay`` weight, and ignores the stage-1 terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvlm import losses as L
from qvlm.config import Config
from qvlm.models.stage1 import Ranks, global_token_mean, stage1_losses
from qvlm.models.vlm import VLM
from qvlm import distributed as D


def step_losses(model: VLM, batch: dict, cfg: Config, generator: torch.Generator | None = None,
                dec_token_id: int | None = None) -> dict[str, Tensor]:
    if cfg.train.stage == 1:
        if dec_token_id is None:
            raise ValueError("stage 1 needs the Q-Former tokenizer's decoder-start token id")
        ranks = Ranks(gather=D.gather_fn(), sum_all=D.sum_fn(), rank=D.rank())
        return stage1_losses(model.qformer, model.heads, model.batch_image_embeds(batch), batch, cfg.train.losses,
                             dec_token_id, ranks=ranks, generator=generator, itm_fraction=cfg.train.itm_fraction)
    return stage2_losses(model, batch, cfg)


def stage2_losses(model: VLM, batch: dict, cfg: Config) -> dict[str, Tensor]:
    """Next-token loss on the assistant tokens only, with the image tokens in the user turn.

    The LM head runs only at supervised positions (a few tokens per example) instead of over the
    whole prompt: with a 49k vocabulary that is most of the logits' cost and memory. With the
    collator's ``image_positions`` and ``label_positions`` (found on the CPU) the image tokens are
    scattered and the supervised positions gathered by index, so the step never waits for the device
    to count them."""
    labelled = batch.get("label_positions")  # (2, S) rows and columns, or None
    if labelled is not None:
        empty = labelled.shape[1] == 0  # counted on the host
    else:
        empty = not bool((batch["labels"] != L.IGNORE_INDEX).any())
    if empty:
        raise ValueError("batch has no supervised tokens: check the chat template and data.max_caption_tokens")
    embeds, _ = model.input_embeds(batch["input_ids"], batch["image_mask"], image_embeds=model.batch_image_embeds(batch),
                                   image_positions=batch.get("image_positions"))
    with model.llm.lora_positions(batch["image_mask"]):
        hidden = model.llm.hidden_states(embeds, padding_mask(batch))  # (B, T, Dlm)
    terms = {"lm": lm_loss(model, hidden, batch["labels"], labelled)}
    weights = {"lm": cfg.train.losses.get("lm", 1.0)}
    if "replay" in batch:  # text-only samples answered by the base model (qvlm.train.replay)
        terms["replay"] = replay_loss(model, batch["replay"], cfg.train.replay_loss)
        weights["replay"] = cfg.train.losses.get("replay", 0.0)
    return L.combine(terms, weights)


def padding_mask(batch: dict) -> Tensor | None:
    """The LLM's attention mask for a training batch: None when the collator right-padded its rows
    (``padding_side``), since under causal attention no real token sees the pads after it, and with
    no mask the attention runs as plain causal attention (SDPA's causal kernels instead of a masked
    one; the pads' own outputs carry no label). The batch's ``attention_mask`` otherwise."""
    return None if batch.get("padding_side") == "right" else batch["attention_mask"]


def replay_loss(model: VLM, replay: dict, kind: str) -> Tensor:
    """On the base model's own answers: "ce", next-token loss on the answer tokens; "kl", KL from
    the base model's (adapters off) next-token distributions at those positions."""
    text = model.llm.embed(replay["input_ids"])  # (R, T', Dlm), no image slots
    hidden = model.llm.hidden_states(text, replay["attention_mask"])  # (R, T', Dlm)
    if kind == "ce":
        return lm_loss(model, hidden, replay["labels"])
    with torch.no_grad(), model.llm.adapters_disabled():
        base = model.llm.hidden_states(text, replay["attention_mask"])  # (R, T', Dlm)
    return token_mean(L.distill_loss_from_hidden(hidden, base, model.llm.logits, replay["labels"]))


def lm_loss(model: VLM, hidden: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """Token-mean next-token loss at the labelled positions (over all ranks' tokens when distributed);
    ``positions``: their (2, S) rows and columns when known (``lm_loss_from_hidden``)."""
    return token_mean(L.lm_loss_from_hidden(hidden, model.llm.logits, labels, positions))  # LM head at labels only


def token_mean(out: L.LmOutput) -> Tensor:
    if D.is_distributed():  # the whole batch's token mean, not the mean of per-rank means
        return global_token_mean(out.loss, out.tokens, D.all_reduce_sum)
    return out.loss
