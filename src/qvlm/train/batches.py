"""Batches for the training loop, each filled to its size after skips, with an exact data position.

The DataLoader reads raw items (decoded records and skip / shard markers; decoding runs in its
workers); ``BatchStream`` takes them one by one, counts every skip by reason, asks the collator to
``prepare`` each record (a prompt that cannot be built, a record missing from the feature cache:
skips too) and collates exactly ``batch_size`` usable records, so a run of bad records never leaves
a batch short (ITC and ITM need at least two pairs). Map-style sources are read in a per-epoch
permutation fixed by (seed, epoch); the position is the number of items this rank has taken since
the pass began, skips included, so a resume continues with the next unread item. Streamed shards
resume at shard granularity through the dataset's own ``state_dict``.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from qvlm.config import Config
from qvlm.data.decode import SkipCounter, SkipRecord
from qvlm.data.sources import open_data
from qvlm.prompt import decoder_start_id
from qvlm import distributed as D


STAGE2_PROMPT_BUDGET = 96  # tokens for the system and user turns around the image slots


class EpochOrder:
    """A permutation of ``range(n)`` fixed by (seed, epoch), read from the global position ``start``
    on and dealt to ranks in blocks: global batch k is positions [k*B*W, (k+1)*B*W) and rank r
    takes its r-th block of B. W ranks x batch B thus see the same samples as one process with
    batch W*B (in the same order once concatenated), and a position saved by W ranks resumes on any
    other number. A last, partial global batch is split evenly (topped up from the permutation's
    start), so every rank has the same number of batches."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def indices(self) -> list[int]:
        perm = self.permutation()
        rest = perm[self.start :]
        if self.world_size == 1:
            return rest
        b, w = self.batch_size, self.world_size
        full = len(rest) // (b * w) * (b * w)
        mine = [i for k in range(0, full, b * w) for i in rest[k + self.rank * b : k + (self.rank + 1) * b]]
        tail = rest[full:]
        if tail:
            per = -(-len(tail) // w)
            tail = (tail + perm * w)[: per * w]  # topped up so every rank gets `per`
            mine += tail[self.rank * per : (self.rank + 1) * per]
        return mine


class EmptyEpoch(RuntimeError):
    """One whole pass over the data gave fewer usable records than one batch."""


def keep_items(items: list[dict]) -> list[dict]:
    """The DataLoader's ``collate_fn``: the raw items, collated later by ``BatchStream``."""
    return items


class BatchStream:
    """An endless iterator of collated batches of ``batch_size`` usable records, with
    ``state_dict``/``load_state_dict``."""

    def __init__(self, dataset, collate: Callable, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, dec_token_id: int | None = None, group_by_length: bool = False):
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.dec_token_id = dec_token_id
        self.streaming = isinstance(dataset, IterableDataset)
        self.order = None if self.streaming else EpochOrder(
            len(dataset), seed, shuffle, rank=D.rank(), world_size=D.world_size(), batch_size=batch_size)
        self.epoch, self.start, self.read = 0, 0, 0  # start: global position of the pass; read: items since
        self.grouped = None
        if group_by_length and not self.streaming:
            if not hasattr(dataset, "caption_lengths"):
                raise ValueError("data.group_by_length needs a map-style source that knows its caption lengths")
            from qvlm.data.collate import LengthGroupedSampler

            self.grouped = LengthGroupedSampler(dataset.caption_lengths(), batch_size, seed=seed,
                                                rank=D.rank(), world_size=D.world_size())
        self.counter = SkipCounter()
        self.details: dict[str, str] = {}  # the first detail of each skip reason, for error messages
        self.replay = None  # stage 2 text replay (qvlm.train.replay.ReplayBatches): batch["replay"]
        self.pending: deque = deque()
        self._it: Iterator | None = None
        self.full_pass, self.usable_in_pass = False, 0
        if not self.streaming and len(self.order.indices()) == 0:
            raise ValueError("the training data source holds no records")

    def loader(self) -> DataLoader:
        """A DataLoader of raw items from the current position: ``read`` items after ``start``."""
        # Its own generator: creating an iterator must not draw from the global RNG (dropout),
        # or a resumed run would see different dropout masks than an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        common = {"collate_fn": keep_items, "num_workers": self.num_workers, "generator": gen}
        self.full_pass = self.start == 0 and self.read == 0
        if self.streaming:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            self.full_pass = self.full_pass and not getattr(self.dataset, "state_dict", lambda: {})().get(
                "shards_done")
            return DataLoader(self.dataset, batch_size=self.batch_size, **common)
        if self.grouped is not None:  # length-grouped batches, the first one cut where the position is
            self.grouped.set_epoch(self.epoch)
            return DataLoader(self.dataset, batch_sampler=drop_first(self.grouped.batches(), self.read), **common)
        self.order.epoch, self.order.start = self.epoch, self.start
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.order.indices()[self.read:],
                          **common)

    def next_item(self) -> dict:
        """This rank's next raw item (record, skip marker or shard marker); rolls over epochs."""
        while not self.pending:
            if self._it is None:
                self._it = iter(self.loader())
            try:
                self.pending.extend(next(self._it))
            except StopIteration:
                self.end_pass()
        self.read += 1
        return self.pending.popleft()

    def end_pass(self) -> None:
        if self.full_pass and self.usable_in_pass < self.batch_size:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.details.items() if v)
            raise EmptyEpoch(f"one pass over the training data gave {self.usable_in_pass} usable records, fewer "
                             f"than one batch ({self.batch_size}): {self.counter.summary()}"
                             + (f" (e.g. {reasons})" if reasons else ""))
        self._it, self.pending = None, deque()
        self.epoch, self.start, self.read, self.usable_in_pass = self.epoch + 1, 0, 0, 0

    def usable(self, item: dict) -> dict | None:
        """The record prepared for collation, or None after counting why it cannot be used."""
        if "shard_done" in item:
            if hasattr(self.dataset, "mark_done"):
                self.dataset.mark_done([item["shard_done"]])
            return None
        if "skip" in item:
            self.counter.skip(item["skip"])
            return None
        try:
            record = self.collate.prepare(item) if hasattr(self.collate, "prepare") else item
        except SkipRecord as exc:
            self.counter.skip(exc.reason)
            self.details.setdefault(exc.reason, exc.detail)
            return None
        for name in record.get("notes", ()):  # e.g. caption_truncated: used, with a note
            self.counter.note(name)
        return record

    def next_batch(self, device: torch.device) -> dict:
        """The next batch of ``batch_size`` usable records, moved to ``device``."""
        records = []
        while len(records) < self.batch_size:
            record = self.usable(self.next_item())
            if record is not None:
                records.append(record)
                self.usable_in_pass += 1
        batch = self.collate(records)
        self.counter.use(len(records))
        pin = device.type == "cuda"  # page-locked: the copies to the GPU overlap
        batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        if self.replay is not None:
            batch["replay"] = self.replay.next_batch(device)
        return batch

    def state_dict(self) -> dict:
        """The data position. Collective when distributed (call it on every rank): each rank's
        position, skip counts summed over ranks and the shards finished by any rank merged."""
        state = {"epoch": self.epoch, "ranks": [{"epoch": self.epoch, "start": self.start, "read": self.read}],
                 "counts": self.counter.to_dict()}
        if self.streaming and hasattr(self.dataset, "state_dict"):
            state["dataset"] = self.dataset.state_dict()
        if self.replay is not None:  # the same on every rank (each reads its own replay rows)
            state["replay"] = self.replay.state_dict()
        if D.is_distributed():
            state = merge_rank_states(D.all_gather_object(state))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start, self.read = position(state, D.world_size(), D.rank(),
                                                     self.batch_size if self.grouped else 0)
        # the saved counts are the sum over ranks: one rank carries them on, or they would be summed again
        self.counter = SkipCounter(**state.get("counts", {})) if D.rank() == 0 else SkipCounter()
        if self.streaming and "dataset" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self._it, self.pending = None, deque()

    def summary(self) -> str:
        return self.counter.summary()


def position(state: dict, world_size: int, rank: int, grouped_batch: int = 0) -> tuple[int, int, int]:
    """(epoch, start, read) of this rank from a saved data position. On the number of ranks that
    saved it, each rank's own. On another number, the pass's start moved on by what every rank had
    read: exact without skips (the global position of the last whole batch), close with them. A
    position saved before per-rank positions existed: the global ``consumed``, or for length-grouped
    batches (``grouped_batch`` = the batch size) the batches done."""
    if "ranks" not in state:
        if grouped_batch:
            return int(state["epoch"]), 0, int(state.get("batches_done", 0)) * grouped_batch
        return int(state["epoch"]), int(state["consumed"]), 0
    ranks = state["ranks"]
    if len(ranks) == world_size:
        return int(ranks[rank]["epoch"]), int(ranks[rank]["start"]), int(ranks[rank]["read"])
    epoch = min(int(r["epoch"]) for r in ranks)
    behind = [r for r in ranks if int(r["epoch"]) == epoch]
    return epoch, int(behind[0]["start"]) + min(int(r["read"]) for r in behind) * len(ranks), 0


def drop_first(batches: list[list[int]], n: int) -> list[list[int]]:
    """The batches of indices without their first ``n`` indices (the first kept batch may be cut)."""
    out = []
    for batch in batches:
        if n >= len(batch):
            n -= len(batch)
            continue
        out.append(batch[n:])
        n = 0
    return out


def merge_rank_states(states: list[dict]) -> dict:
    """One data position from every rank's: rank 0's position, skip counts summed, finished shards united."""
    merged = dict(states[0])
    counts: dict = {}
    for state in states:
        for key, value in state["counts"].items():
            if isinstance(value, dict):
                inner = counts.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v
            else:
                counts[key] = counts.get(key, 0) + value
    merged["counts"] = counts
    merged["ranks"] = [entry for state in states for entry in state["ranks"]]  # in rank order
    if "dataset" in merged and "shards_done" in merged["dataset"]:
        done = sorted({s for state in states for s in state.get("dataset", {}).get("shards_done", ())})
        merged["dataset"] = {**merged["dataset"], "shards_done": done}
    return merged


def build_stream(cfg: Config, model, split: str = "train", progress: bool = True) -> BatchStream:
    """The training stream for ``cfg.data.source``: stage 1 tokenises captions for the Q-Former,
    stage 2 builds chat prompts with image slots for the LLM."""
    from qvlm.model_sources import load_tokenizer

    q = cfg.model.qformer
    qformer_tokenizer = load_tokenizer(q.tokenizer or q.source, cfg.model.trust_remote_code)
    features = open_feature_cache(cfg, model, split, progress=progress)
    dataset = open_data(cfg, cfg.data.source, split, decode_images=features is None,
                        rank=D.rank(), world_size=D.world_size(), seed=cfg.train.seed,
                        shuffle=cfg.data.shuffle_shards)
    if cfg.train.stage == 1:
        from qvlm.data.collate import Stage1Collator

        collate = Stage1Collator(model.vision.processor, qformer_tokenizer, max_text_len=q.max_text_len,
                                 features=features)
    else:
        from qvlm.data.collate_stage2 import Stage2Collator

        collate = Stage2Collator(model.vision.processor, model.llm.tokenizer, q.num_queries, cfg.model.llm,
                                 max_len=cfg.data.max_caption_tokens + STAGE2_PROMPT_BUDGET + q.num_queries,
                                 features=features, seed=cfg.train.seed, caption_prob=cfg.data.caption_prob)
    stream = BatchStream(dataset, collate, cfg.train.batch_size, seed=cfg.train.seed,
                         num_workers=cfg.data.num_workers, dec_token_id=decoder_start_id(qformer_tokenizer),
                         group_by_length=cfg.data.group_by_length)
    if cfg.train.stage == 2 and cfg.train.losses.get("replay", 0) > 0:
        stream.replay = build_replay(cfg, model)
    return stream


def build_replay(cfg: Config, model):
    """Stage-2 text replay: the base LLM answers the replay instructions (adapters off), and those
    answers become text-only samples. Answers naming a retention fact's keyword are dropped."""
    from qvlm.eval.retention import FACTS
    from qvlm.train.replay import ReplayBatches, base_answers, load_prompts, replay_examples

    prompts = load_prompts(cfg.data.replay_prompts)
    replay = base_answers(model.llm, prompts, exclude=[k for f in FACTS for k in f.keywords])
    if D.rank() == 0:
        print(f"text replay: {len(replay.pairs)} base-model answers to {len(prompts)} instructions "
              f"(dropped: {replay.dropped})", file=sys.stderr, flush=True)
    tok = model.llm.tokenizer
    examples = replay_examples(tok, replay.pairs, cfg.data.max_caption_tokens + STAGE2_PROMPT_BUDGET)
    # each rank its own permutation (seed + rank); all ranks move in step, so rank 0's saved position
    # resumes every rank
    return ReplayBatches(examples, cfg.train.replay_batch_size, tok.pad_token_id, seed=cfg.train.seed + D.rank())


def open_feature_cache(cfg: Config, model, split: str, progress: bool = True):
    """With ``data.cache_dir`` set: build (or confirm, or rebuild if stale) the cache, then open it."""
    if not cfg.data.cache_dir:
        return None
    from qvlm.data.cache import CachedFeatures, run_cache_features

    if D.rank() == 0:
        run_cache_features(cfg.data.source, model.vision, cfg.data.cache_dir, split=split,
                           augment=cfg.data.augment, max_pixels=cfg.data.max_image_pixels, progress=progress)
    D.barrier()  # the other ranks open the cache only once rank 0 has finished writing it
    return CachedFeatures.open(cfg.data.cache_dir, model.vision)
