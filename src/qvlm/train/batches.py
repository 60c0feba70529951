"""Batches for the training loop, with an exact, resumable data position.

Map-style sources are read in a per-epoch permutation fixed by (seed, epoch); the position is
(epoch, samples consumed), counted on the main process as batches are *consumed* (not as workers
prefetch them), so a resume skips exactly what was trained on. Streamed shards resume at shard
granularity through the dataset's own ``state_dict``. Skipped records are counted throughout.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from qvlm.config import Config
from qvlm.data.decode import SkipCounter
from qvlm.data.sources import open_data
from qvlm.prompt import decoder_start_id
from qvlm import distributed as D


STAGE2_PROMPT_BUDGET = 96  # tokens for the system and user turns around the image slots


class EpochSampler(Sampler[int]):
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

    def order(self) -> list[int]:
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

    def advance(self, position: int) -> int:
        """The global position after one more batch of every rank (capped at the epoch's end)."""
        return min(position + self.batch_size * self.world_size, self.n)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def __len__(self) -> int:
        return len(self.order())


class BatchStream:
    """An endless iterator of collated batches with ``state_dict``/``load_state_dict``."""

    def __init__(self, dataset, collate: Callable, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, dec_token_id: int | None = None, group_by_length: bool = False):
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.dec_token_id = dec_token_id
        self.streaming = isinstance(dataset, IterableDataset)
        self.sampler = None if self.streaming else EpochSampler(
            len(dataset), seed, shuffle, rank=D.rank(), world_size=D.world_size(), batch_size=batch_size)
        self.epoch, self.consumed, self.batches_done = 0, 0, 0
        self.grouped = None
        if group_by_length and not self.streaming:
            if not hasattr(dataset, "caption_lengths"):
                raise ValueError("data.group_by_length needs a map-style source that knows its caption lengths")
            from qvlm.data.collate import LengthGroupedSampler

            self.grouped = LengthGroupedSampler(dataset.caption_lengths(), batch_size, seed=seed,
                                                rank=D.rank(), world_size=D.world_size())
        self.counter = SkipCounter()
        self.replay = None  # stage 2 text replay (qvlm.train.replay.ReplayBatches): batch["replay"]
        self._it: Iterator | None = None
        if not self.streaming and len(self.sampler.order()) == 0:
            raise ValueError("the training data source holds no records")

    def loader(self) -> DataLoader:
        # Its own generator: creating an iterator must not draw from the global RNG (dropout),
        # or a resumed run would see different dropout masks than an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        pin = torch.cuda.is_available()  # page-locked batches: the non_blocking copies to the GPU overlap
        if self.streaming:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate,
                              num_workers=self.num_workers, generator=gen, pin_memory=pin)
        if self.grouped is not None:  # length-grouped batches, resumed by whole batches
            self.grouped.set_epoch(self.epoch)
            return DataLoader(self.dataset, batch_sampler=self.grouped.batches()[self.batches_done:],
                              collate_fn=self.collate, num_workers=self.num_workers, generator=gen, pin_memory=pin)
        self.sampler.epoch, self.sampler.start = self.epoch, self.consumed
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, generator=gen,
                          pin_memory=pin, persistent_workers=False)

    def next_batch(self, device: torch.device) -> dict:
        """The next non-empty batch, moved to ``device``; rolls over epochs."""
        for _ in range(10_000):
            if self._it is None:
                self._it = iter(self.loader())
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.consumed, self.batches_done = self.epoch + 1, 0, 0
                continue
            self.account(batch)
            if batch.get("input_ids") is not None and len(batch["input_ids"]) > 0:
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                if self.replay is not None:
                    batch["replay"] = self.replay.next_batch(device)
                return batch
        raise RuntimeError(f"no usable records in the data source ({self.counter.summary()})")

    def account(self, batch: dict) -> None:
        self.counter.update(batch)
        if self.sampler is not None and self.grouped is None:  # the global position, on every rank
            self.consumed = self.sampler.advance(self.consumed)
        else:
            self.consumed += len(batch.get("keys", ())) + sum(batch.get("skipped", {}).values())
        self.batches_done += 1
        if self.streaming and hasattr(self.dataset, "mark_done"):
            self.dataset.mark_done(batch.get("shards_done", ()))

    def state_dict(self) -> dict:
        """The data position. Collective when distributed (call it on every rank): skip counts are
        summed over ranks and the shards finished by any rank are merged, so W ranks' position
        resumes on any number of ranks."""
        state = {"epoch": self.epoch, "consumed": self.consumed, "batches_done": self.batches_done,
                 "counts": self.counter.to_dict()}
        if self.streaming and hasattr(self.dataset, "state_dict"):
            state["dataset"] = self.dataset.state_dict()
        if self.replay is not None:  # the same on every rank (each reads its own replay rows)
            state["replay"] = self.replay.state_dict()
        if D.is_distributed():
            state = merge_rank_states(D.all_gather_object(state))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.batches_done = int(state.get("batches_done", 0))
        # the saved counts are the sum over ranks: one rank carries them on, or they would be summed again
        self.counter = SkipCounter(**state.get("counts", {})) if D.rank() == 0 else SkipCounter()
        if self.streaming and "dataset" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self._it = None

    def summary(self) -> str:
        return self.counter.summary()


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
