"""Image-text retrieval (R@1/5/10 both ways) from ITC, then ITM re-ranking of the top-k; and
zero-shot classification from class-name prompts (BLIP-2 §4.4 protocol, on any data source).

A retrieved item counts as a hit when its caption is identical to the query's own caption (the
synthetic scenes repeat captions, so several texts can be right for one image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qvlm.models.stage1 import itm_match_prob
from qvlm.models.vlm import VLM
from qvlm import distributed as D

KS = (1, 5, 10)


@dataclass
class Encoded:
    image_embeds: Tensor  # (M, N, Dv) frozen features, kept for ITM re-ranking
    image_feats: Tensor  # (M, Q, E) normalised
    text_feats: Tensor  # (M, E) normalised
    input_ids: Tensor  # (M, T)
    attention_mask: Tensor  # (M, T)
    captions: list[str]


@torch.no_grad()
def encode(model: VLM, batches, sharded: bool = False) -> Encoded:
    """Run every batch (``image_embeds`` or ``pixel_values`` + tokenised captions) through ITC.

    ``sharded``: each rank got its own batches (``eval_batches(shard=True)``, each with its
    ``chunk`` index); the encodings are gathered so that every rank holds all of them, in order."""
    host = _to_host if sharded else _stay  # only what is sent to other ranks leaves the device
    done = []
    for i, batch in enumerate(batches):
        emb = model.batch_image_embeds(batch)
        out = model.qformer(image_embeds=emb, input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"], mode="unimodal")
        done.append((batch.get("chunk", i), {
            "emb": host(emb), "img": host(model.heads.image_feats(out.query)),
            "txt": host(model.heads.text_feat(out.text)), "ids": host(batch["input_ids"]),
            "mask": host(batch["attention_mask"]), "cap": batch["captions"]}))
    parts = D.gather_ordered(done) if sharded else [part for _, part in done]
    if not parts:
        raise ValueError("retrieval evaluation got no usable records")
    device = next(model.qformer.parameters()).device
    max_len = max(p["ids"].shape[1] for p in parts)
    pad = lambda key: torch.cat([torch.nn.functional.pad(p[key], (0, max_len - p[key].shape[1]))  # noqa: E731
                                 for p in parts]).to(device)
    cat = lambda key: torch.cat([p[key] for p in parts]).to(device)  # noqa: E731
    return Encoded(cat("emb"), cat("img"), cat("txt"), pad("ids"), pad("mask"),
                   [c for p in parts for c in p["cap"]])


def _to_host(t: Tensor) -> Tensor:
    return t.cpu()


def _stay(t: Tensor) -> Tensor:
    return t


def itc_similarity(enc: Encoded) -> Tensor:
    """(M images, M texts): max over queries of the cosine similarity."""
    sim = torch.einsum("iqe,je->iqj", enc.image_feats, enc.text_feats)  # (M, Q, M)
    return sim.max(dim=1).values


def same_caption(captions: list[str]) -> Tensor:
    """(M, M) bool: text j is a correct match for image i."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    codes = torch.tensor([ids[c] for c in captions])
    return codes[:, None] == codes[None, :]


def recall_at_k(scores: Tensor, truth: Tensor, ks=KS) -> dict[int, float]:
    """Share of rows whose best-ranked correct column is within the top k."""
    order = scores.argsort(dim=1, descending=True)
    hits = torch.gather(truth, 1, order)  # (M, M) bool, in ranked order
    first = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.full_like(hits[:, 0], 10**9, dtype=torch.long))
    return {k: float((first < k).float().mean()) for k in ks}


@torch.no_grad()
def rerank(model: VLM, enc: Encoded, sim: Tensor, k: int, images_are_queries: bool,
           batch_size: int = 64, sharded: bool = False) -> Tensor:
    """(queries, candidates) scores: each query's top-k candidates by ITC get ITM P(match) + ITC
    similarity (BLIP-2's re-ranking); all other candidates get -inf. ``sharded``: the ITM pairs are
    split over ranks and the scores gathered."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (M, k)
    rows = torch.arange(sim.shape[0]).repeat_interleave(k)
    cols = top.reshape(-1)
    images, texts = (rows, cols) if images_are_queries else (cols, rows)
    starts = list(range(0, rows.numel(), batch_size))
    mine = D.shard(starts) if sharded else list(enumerate(starts))
    probs = []
    for n, start in mine:
        i, t = images[start:start + batch_size], texts[start:start + batch_size]
        probs.append((n, itm_match_prob(model.qformer, model.heads, enc.image_embeds[i], enc.input_ids[t],
                                        enc.attention_mask[t])))
    ordered = D.gather_ordered([(n, p.cpu()) for n, p in probs]) if sharded else [p for _, p in probs]
    scores = torch.full_like(sim, float("-inf"))
    scores[rows, cols] = torch.cat(ordered).to(sim.device) + sim[rows, cols]
    return scores


def retrieval_metrics(model: VLM, batches, rerank_k: int = 16, sharded: bool = False) -> dict[str, float]:
    """ITC R@K both ways, then (rerank_k > 0) the same after ITM re-ranking of the top-k.
    ``sharded``: the work is split over ranks (see ``encode``); every rank returns the same metrics."""
    enc = encode(model, batches, sharded)
    sim = itc_similarity(enc)
    truth = same_caption(enc.captions)
    out: dict[str, float] = {"n": len(enc.captions)}
    out.update({f"itc_i2t_r{k}": v for k, v in recall_at_k(sim, truth).items()})
    out.update({f"itc_t2i_r{k}": v for k, v in recall_at_k(sim.T, truth.T).items()})
    if rerank_k > 0:
        i2t = rerank(model, enc, sim, rerank_k, images_are_queries=True, sharded=sharded)
        t2i = rerank(model, enc, sim.T, rerank_k, images_are_queries=False, sharded=sharded)
        out.update({f"i2t_r{k}": v for k, v in recall_at_k(i2t, truth).items()})
        out.update({f"t2i_r{k}": v for k, v in recall_at_k(t2i, truth.T).items()})
    else:
        out.update({k[4:]: v for k, v in list(out.items()) if k.startswith("itc_")})
    return out


def eval_batches(cfg, model: VLM, source: str | None = None, split: str = "test", shard: bool = False):
    """Collated batches of the first ``eval.max_samples`` usable records of ``source``
    (default ``eval.data``, else the ``test`` split of ``data.source``). ``shard``: only this
    rank's batches (every world_size-th), each tagged with its ``chunk`` index."""
    from qvlm.data.collate import Stage1Collator
    from qvlm.model_sources import load_tokenizer

    q = cfg.model.qformer
    tokenizer = load_tokenizer(q.tokenizer or q.source, cfg.model.trust_remote_code)
    collate = Stage1Collator(model.vision.processor, tokenizer, max_text_len=q.max_text_len)
    records = load_records(cfg, source, split, cfg.eval.max_samples)
    starts = list(range(0, len(records), cfg.eval.batch_size))
    for chunk, start in (D.shard(starts) if shard else enumerate(starts)):
        yield {**collate(records[start:start + cfg.eval.batch_size]), "chunk": chunk}


def load_records(cfg, source: str | None, split: str, max_samples: int) -> list[dict]:
    """The first ``max_samples`` usable records of ``source`` (default: ``eval_source(cfg)``)."""
    from qvlm.data.records import iter_records
    from qvlm.data.sources import open_data

    source = source or eval_source(cfg)
    if source is None:
        raise ValueError("data.source is a stream of tar shards with no test split: set eval.data "
                         "(or pass --data) to evaluate on held-out records")
    return list(iter_records(open_data(cfg, source, split), limit=max_samples, images_only=True))


def eval_source(cfg) -> str | None:
    """eval.data, else data.source when it has a test split (not for streamed shards)."""
    from qvlm.data.webdataset import looks_like_shards

    if cfg.eval.data:
        return cfg.eval.data
    source = cfg.data.source
    folder = Path(source).expanduser()
    shards_dir = folder.is_dir() and any(folder.glob("*.tar")) and not any(folder.glob("test.*"))
    return None if looks_like_shards(source) or shards_dir else source


def evaluate_retrieval(model: VLM, cfg, source: str | None = None, split: str = "test") -> dict[str, float]:
    """What the training loop calls periodically: retrieval R@K with ``primary`` naming the key to track."""
    model.require_text("retrieval")
    sharded = D.is_distributed()  # during multi-process training: every rank encodes its share
    metrics = retrieval_metrics(model, eval_batches(cfg, model, source, split, shard=sharded),
                                rerank_k=cfg.eval.itm_rerank_k, sharded=sharded)
    metrics["r1_mean"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    metrics["primary"] = "r1_mean"
    return metrics
