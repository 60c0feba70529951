"""The loss of one micro-batch for each stage, as named terms (``loss`` is what gets back-propagated).

Stage 1 uses the ITC/ITM/ITG weights of ``train.losses``; stage 2 uses its ``lm`` weight (1 when
absent) and, with text replay on, its ``replay`` weight, and ignores the stage-1 terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvlm import losses as L
from qvlm.config import Config
from qvlm.models.attention_kernel import training_kernel
from qvlm.models.stage1 import global_token_mean, stage1_losses
from qvlm.models.vlm import VLM
from qvlm.train import distributed as D


def image_embeds_of(model: VLM, batch: dict) -> Tensor:
    """Cached frozen features when the batch has them, else run the frozen tower on the pixels."""
    if "image_embeds" in batch:
        return batch["image_embeds"].float()  # (B, N, Dv), fp16 in the cache
    return model.image_features(batch["pixel_values"])  # (B, N, Dv)


def step_losses(model: VLM, batch: dict, cfg: Config, generator: torch.Generator | None = None,
                dec_token_id: int | None = None) -> dict[str, Tensor]:
    if cfg.train.stage == 1:
        if dec_token_id is None:
            raise ValueError("stage 1 needs the Q-Former tokenizer's decoder-start token id")
        return stage1_losses(
            model.qformer, model.heads, image_embeds_of(model, batch), batch["input_ids"],
            batch["attention_mask"], cfg.train.losses, dec_token_id,
            gather=D.gather_fn(), rank=D.rank(), generator=generator, sum_all=D.sum_fn(),
            itm_fraction=cfg.train.itm_fraction, itg_positions=batch.get("itg_positions"),
            one_pass=cfg.train.itc_one_pass, reuse_image_kv=cfg.train.itm_reuse_image_kv,
        )
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
    embeds, _ = model.input_embeds(batch["input_ids"], batch["image_mask"], image_embeds=image_embeds_of(model, batch),
                                   image_positions=batch.get("image_positions"))
    k = shareable_prefix(model, batch, cfg)  # positions run once, without autograd
    # llm_kernel: math attention on short CPU sequences
    with llm_kernel(model, embeds), model.llm.lora_positions(batch["image_mask"][:, k:]):
        hidden = model.llm.hidden_states(embeds, padding_mask(batch), prefix=k)  # (B, T - k, Dlm)
    if labelled is not None and k:
        labelled = torch.stack([labelled[0], labelled[1] - k])  # columns of the positions after the prefix
    terms = {"lm": lm_loss(model, hidden, batch["labels"][:, k:], labelled)}  # no label before the image
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


def shareable_prefix(model: VLM, batch: dict, cfg: Config) -> int:
    """How many leading positions of the batch the LLM may run once for all rows, without autograd
    (``train.share_prompt_prefix``; "auto": on CPU only): the prompt tokens every row shares before
    its image slots (the collator's ``shared_prefix``), when nothing trainable acts there: the adapters
    act from the image on only, and the LLM's input embeddings are frozen. 0 under LLM gradient
    checkpointing (its recomputation runs without the key/value cache) and with compiled layers (the
    cache's guards recompile every layer: 2.1x slower on an H100)."""
    share = cfg.train.share_prompt_prefix
    if share == "auto":  # on a GPU the extra pass's launches cost more than it saves (benchmarks/RESULTS.md)
        share = batch["input_ids"].device.type == "cpu"
    if not (share and model.llm.lora_limited) or cfg.train.compile or model.llm.checkpointing:
        return 0
    if model.llm.model.get_input_embeddings().weight.requires_grad:
        return 0
    return int(batch.get("shared_prefix", 0))


def replay_loss(model: VLM, replay: dict, kind: str) -> Tensor:
    """On the base model's own answers: "ce", next-token loss on the answer tokens; "kl", KL from
    the base model's (adapters off) next-token distributions at those positions."""
    text = model.llm.embed(replay["input_ids"])  # (R, T', Dlm), no image slots
    with llm_kernel(model, text):
        hidden = model.llm.hidden_states(text, replay["attention_mask"])  # (R, T', Dlm)
    if kind == "ce":
        return lm_loss(model, hidden, replay["labels"])
    with torch.no_grad(), model.llm.adapters_disabled():
        base = model.llm.hidden_states(text, replay["attention_mask"])  # (R, T', Dlm)
    return token_mean(L.distill_loss_from_hidden(hidden, base, model.llm.logits, replay["labels"]))


def llm_kernel(model: VLM, embeds: Tensor):
    """The attention kernel of a training forward through the LLM (``attention_kernel``). Not with
    activation checkpointing: the backward recomputes the layers outside this context, with
    PyTorch's own kernel, and a recomputation must match its forward."""
    needs_grad = torch.is_grad_enabled() and not model.llm.checkpointing
    return training_kernel(embeds.device, embeds.shape[1], needs_grad)


def lm_loss(model: VLM, hidden: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """Token-mean next-token loss at the labelled positions (over all ranks' tokens when distributed);
    ``positions``: their (2, S) rows and columns when known (``lm_loss_from_hidden``)."""
    return token_mean(L.lm_loss_from_hidden(hidden, model.llm.logits, labels, positions))  # LM head at labels only


def token_mean(out: L.LmOutput) -> Tensor:
    if D.is_distributed():  # the whole batch's token mean, not the mean of per-rank means
        return global_token_mean(out.loss, out.tokens, D.all_reduce_sum)
    return out.loss
