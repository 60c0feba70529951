"""Stage-1 collation: records -> a batch of pixels (or cached features) and Q-Former text tokens.

``Stage1Collator`` takes usable records (skip markers are counted before, by the training stream:
``prepare`` is its per-record check), runs the vision tower's ``ImageProcessor`` (resize +
normalise), and tokenises captions with dynamic padding to the longest caption in the batch, cut at
``max_text_len`` tokens. With a feature cache it returns ``image_embeds`` (B, N, Dv) looked up by
``image_id`` instead of ``pixel_values`` (B, 3, H, W); ``prepare`` skips a record missing from the
cache as ``not_in_cache``. ``itg_positions`` (2, S) are the rows and columns that predict a caption
token, found here on the CPU so the training step need not ask the device.

Augmentation (``Augment``: random resized crop, optional horizontal flip) is off by default: on the
synthetic scenes a flip swaps "left" and "right" and a crop can cut objects out, making captions
wrong. It cannot be combined with the feature cache (one fixed view per image is cached).

``LengthGroupedSampler`` is a batch sampler that puts captions of similar length together (less
padding), deterministic from (seed, epoch).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Sampler

from qvlm.data.cache import AUGMENT_AND_CACHE
from qvlm.data.decode import SkipRecord
from qvlm.data.records import is_text_only
from qvlm.losses import itg_positions


@dataclass(frozen=True)
class Augment:
    """Random resized crop (area fraction in ``scale``, aspect in ``ratio``) and an optional flip.

    Draws from torch's global RNG, which the DataLoader seeds per worker."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        u = torch.rand(4).tolist()
        area = w * h * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        left, top = round(u[2] * (w - cw)), round(u[3] * (h - ch))
        img = img.crop((left, top, left + cw, top + ch))
        if self.flip and torch.rand(()).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


def check_cached(record: dict, features) -> dict:
    if features is not None and record["image_id"] not in features:
        raise SkipRecord("not_in_cache", record.get("key", ""))
    return record


class Stage1Collator:
    """records -> {"pixel_values" | "image_embeds", "input_ids", "attention_mask", "itg_positions",
    "captions", "keys", ...}."""

    def __init__(self, processor=None, tokenizer=None, max_text_len: int = 32, augment: Augment | None = None,
                 features=None, feature_dtype: torch.dtype = torch.float32):
        if augment is not None and features is not None:
            raise ValueError(AUGMENT_AND_CACHE)
        if processor is None and features is None:
            raise ValueError("Stage1Collator needs an image processor or a feature cache")
        if tokenizer is None:
            raise ValueError("Stage1Collator needs the Q-Former tokenizer")
        self.processor, self.tokenizer, self.max_text_len = processor, tokenizer, max_text_len
        self.augment, self.features, self.feature_dtype = augment, features, feature_dtype

    def prepare(self, record: dict) -> dict:
        """The record if it can go into a batch, else ``SkipRecord`` (the training stream's check;
        a text-only conversation has no image for stage 1)."""
        if is_text_only(record):
            raise SkipRecord("text_only", record.get("key", ""))
        return check_cached(record, self.features)

    def __call__(self, records: list[dict]) -> dict:
        batch = {"keys": [r["key"] for r in records], "captions": [r["caption"] for r in records],
                 "attributes": [r.get("attributes") for r in records]}
        batch.update(self.tokenize(batch["captions"]))
        if self.features is not None:
            batch["image_embeds"] = self.features.get([r["image_id"] for r in records], self.feature_dtype)
        else:
            batch["pixel_values"] = self.pixels(records)
        return batch

    def tokenize(self, captions: list[str]) -> dict:
        if not captions:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(),
                    "itg_positions": torch.zeros((2, 0), dtype=torch.long)}
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T) each
        return {"input_ids": ids, "attention_mask": mask, "itg_positions": itg_positions(mask)}

    def pixels(self, records: list[dict]) -> torch.Tensor:
        if not records:
            size = self.processor.size
            return torch.zeros((0, 3, size, size))
        images = [r["image"] for r in records]
        if self.augment is not None:
            images = [self.augment(img) for img in images]
        return self.processor(images)  # (B, 3, H, W)


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of indices with similar ``lengths``: shuffle, cut into groups of ``group_size``, sort
    each group by length, cut into batches, shuffle the batches. Ranks take every world_size-th batch
    (truncated to the same count on every rank)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group_size: int | None = None,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_size = group_size or 50 * batch_size
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for g in range(0, len(order), self.group_size):
            group = sorted(order[g:g + self.group_size], key=lambda i: -self.lengths[i])
            batches += [group[b:b + self.batch_size] for b in range(0, len(group), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank::self.world_size][:per_rank]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
