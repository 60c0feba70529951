"""Stage-2 collation: records -> chat-formatted LLM inputs with image slots and assistant-only labels.

``Stage2Collator`` takes usable records like the stage-1 collator (``prepare`` is the training
stream's per-record check: a record whose prompt cannot be built, or missing from the feature
cache, is a skip), gives pixels through the vision tower's ``ImageProcessor`` or, with a feature
cache, ``image_embeds`` looked up by ``image_id``, and builds each sample with ``qvlm.prompt``: a
caption task (system + user prompt drawn from the config lists, the caption) or the record's whole
conversation, ``num_queries`` image slots in place, labels on every assistant turn + end of turn.
A text-only record (no image) gets no image slots, and no pixels or features: those come for the
rows with an image only. Rows are right-padded to the longest (pad id, -100, False).

The prompt choice is a pure function of (seed, record key): the same record gets the same prompt in
any batch, worker or resumed run, and global RNG state is never touched. Every sample passes
``check_labels`` and every non-empty batch ``check_batch``, so a chat template that disagrees with
the label mask fails at the first batch instead of training on the wrong tokens.
"""

from __future__ import annotations

import random

import torch

from qvlm.config import LLMConfig
from qvlm.data.collate import check_cached
from qvlm.data.decode import SkipRecord
from qvlm.data.records import is_text_only
from qvlm.prompt import IGNORE, Conversation, Example, PromptError, build_chat, check_batch, check_labels, \
    pick_conversation


class Stage2Collator:
    """records -> {"pixel_values" | "image_embeds", "input_ids", "attention_mask", "labels", "image_mask",
    "padding_side", "image_positions", "label_positions", "keys", "captions", "targets" (the first
    assistant turn), "prompts" (the first user turn), "conversations", "attributes"}."""

    def __init__(self, processor, tokenizer, num_queries: int, llm_cfg: LLMConfig, max_len: int = 256,
                 features=None, seed: int = 0, caption_prob: float = 0.5,
                 feature_dtype: torch.dtype = torch.float32):
        if processor is None and features is None:
            raise ValueError("Stage2Collator needs an image processor or a feature cache")
        if tokenizer is None:
            raise ValueError("Stage2Collator needs the LLM tokenizer")
        self.processor, self.tokenizer, self.num_queries = processor, tokenizer, num_queries
        self.llm_cfg, self.max_len, self.features, self.seed = llm_cfg, max_len, features, seed
        self.caption_prob, self.feature_dtype = caption_prob, feature_dtype
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad

    def prepare(self, record: dict) -> dict:
        """The record with its conversation and example built, or ``SkipRecord``: a record whose
        prompt cannot be built (a template that rejects the turns, a prompt longer than the length
        limit) is skipped as ``bad_prompt``, not fatal. Trailing turns dropped to fit the length
        limit are counted as ``turns_dropped`` notes, one per turn."""
        if not is_text_only(record):
            check_cached(record, self.features)
        try:
            chat = self.conversation(record)
            example = self.example(chat, not is_text_only(record))
        except PromptError as exc:
            raise SkipRecord("bad_prompt", f"{record.get('key', '')}: {exc}") from exc
        notes = tuple(record.get("notes", ())) + ("turns_dropped",) * example.dropped_turns
        return {**record, "_chat": chat, "_example": example, "notes": notes}

    def __call__(self, records: list[dict]) -> dict:
        chats = [r["_chat"] if "_chat" in r else self.conversation(r) for r in records]
        examples = [r["_example"] if "_example" in r else self.example(c, not is_text_only(r))
                    for r, c in zip(records, chats)]
        batch = {"keys": [r["key"] for r in records], "captions": [r.get("caption") for r in records],
                 "targets": [c.target for c in chats], "prompts": [c.user for c in chats],
                 "conversations": [c.messages for c in chats],
                 "attributes": [r.get("attributes") for r in records]}
        batch.update(pad_examples(examples, self.pad_id))
        batch["padding_side"] = "right"  # pad_examples: every row's padding after its last token
        batch.update(positions(batch["image_mask"], batch["labels"]))
        if records:
            check_batch(batch["labels"])
        seen = [r for r in records if not is_text_only(r)]  # image rows, in order: their slots are row-major
        if self.features is not None:
            batch["image_embeds"] = self.features.get([r["image_id"] for r in seen], self.feature_dtype)
        else:
            batch["pixel_values"] = self.pixels(seen)
        return batch

    def rng(self, key: str) -> random.Random:
        """The record's own generator: a pure function of (seed, key) (string seeds hash with SHA-512)."""
        return random.Random(f"qvlm-stage2:{self.seed}:{key}")

    def conversation(self, record: dict) -> Conversation:
        return pick_conversation(record, self.llm_cfg, self.rng(record["key"]), self.caption_prob)

    def example(self, chat: Conversation, image: bool = True) -> Example:
        example = build_chat(self.tokenizer, self.num_queries if image else 0, chat.messages,
                             self.llm_cfg.image_placeholder, self.max_len, self.llm_cfg.image_position)
        check_labels(self.tokenizer, example)
        return example

    def pixels(self, records: list[dict]) -> torch.Tensor:
        if not records:
            size = self.processor.size
            return torch.zeros((0, 3, size, size))
        return self.processor([r["image"] for r in records])  # (B, 3, H, W)


def positions(image_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the image slots are and which positions predict a labelled token, as (2, N) row and
    column indices in row-major order, found here on the CPU: a training step on a GPU then gathers
    and scatters by index instead of by boolean mask, which would wait for the device to count."""
    return {"image_positions": image_mask.nonzero().T.contiguous(),  # (2, B*Q)
            "label_positions": (labels[:, 1:] != IGNORE).nonzero().T.contiguous()}  # (2, S): t predicts t + 1


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with ``pad_id``, labels with -100, masks with 0/False."""
    b, t = len(examples), max((len(e.input_ids) for e in examples), default=0)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    image_mask = torch.zeros((b, t), dtype=torch.bool)  # (B, T), Q True per row
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
        image_mask[i, :n] = torch.tensor(e.image_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "image_mask": image_mask}
