"""Text generation for the VLM's language model: greedy, sampling and beam search, batched, KV-cached.

The prompt arrives as embeddings (text embeddings with the projected image tokens merged in,
BLIP-2 §3.3), so this drives the LLM's forward directly instead of ``transformers``' ``generate``
(which wants token ids). Reference behaviour: HF ``GenerationMixin`` greedy/beam/top-p/CTRL penalty;
the loop is written here, nanoVLM-style, small enough to read in one sitting.

Batching: prompts of different lengths are LEFT-padded (``pad_left``) so every row's next token
sits at the last position; position ids are counted from the attention mask, so a padded row
generates exactly what it would alone. With ``use_cache`` the prompt runs once (prefill) and each
step feeds only the new token's embedding plus a ``transformers.DynamicCache``; without it the
whole sequence is recomputed every step. Both paths share one loop and give the same greedy tokens.

Compiled decoding (``compile=True``): the cache is a ``transformers.StaticCache`` whose length is
rounded up to a power of two (``static_cache_length``), so every decoding step has the same shapes
and runs one ``torch.compile``'d forward of the LLM (``LanguageModel.compiled_model``; CUDA graphs on
a GPU). The prompt's prefill stays eager. The first call compiles (a minute or more); later calls
reuse it, so it pays off in a server or a long captioning run, not for one short caption.

Streaming: greedy/sampling accept ``on_step(ids, reasons)``, called after every step with each
row's new tokens so far and its finish reason (None while running); it may return ``{row: reason}``
to finish rows early (a server stops a row whose client left, or whose own token budget is spent).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

from qvlm.models.llm import LanguageModel


StepCallback = Callable[[list[list[int]], list[str | None]], Mapping[int, str] | None]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only: keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # CTRL-style; 1.0 = off (see ``repetition_penalty``)
    num_beams: int = 1
    stop: list[str] = field(default_factory=list)  # stop strings, matched in the decoded new text
    use_cache: bool = True
    compile: bool = False  # decoding steps through a compiled forward and a static KV cache
    seed: int | None = None  # sampling RNG; None = torch's global RNG

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (not (self.do_sample and self.num_beams > 1), "sampling and beam search do not mix"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty: {self.stop!r}"),
            (self.use_cache or not self.compile, "compile=True decodes through the KV cache; use_cache must be on"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class GenerationOutput:
    texts: list[str]  # new text only, cut before a stop string
    token_ids: list[list[int]]  # new tokens only, without the eos / the tokens of the stop string
    finish_reasons: list[str]  # "stop" (eos or stop string) or "length" (max_new_tokens)
    num_prompt_tokens: list[int]  # unpadded prompt length per row (image slots included)


# ---- inputs ------------------------------------------------------------------------------

def pad_left(input_ids_list: Sequence[Sequence[int] | Tensor], image_mask_list: Sequence[Any] | None,
             pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad prompts to one batch: -> input_ids (B, T), attention_mask (B, T), image_mask (B, T) bool."""
    rows = [torch.as_tensor(ids, dtype=torch.long).flatten() for ids in input_ids_list]
    masks = ([torch.zeros(len(r), dtype=torch.bool) for r in rows] if image_mask_list is None
             else [torch.as_tensor(m, dtype=torch.bool).flatten() for m in image_mask_list])
    if not rows or len(masks) != len(rows) or any(len(m) != len(r) for m, r in zip(masks, rows)):
        raise ValueError("pad_left needs one or more prompts, each with an image mask of its own length")
    t = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(len(rows), t, dtype=torch.long)  # (B, T)
    image_mask = torch.zeros(len(rows), t, dtype=torch.bool)  # (B, T)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, t - len(r):], attention_mask[i, t - len(r):], image_mask[i, t - len(r):] = r, 1, m
    return input_ids, attention_mask, image_mask


# ---- logits processing (pure functions) ----------------------------------------------------

def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty (Keskar et al. 2019): for tokens marked in ``seen`` (R, V) bool, divide positive
    logits and multiply negative ones by ``penalty``; other logits are unchanged. (R, V) -> (R, V)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``top_p`` (always
    at least one); the rest get -inf. (R, V) -> (R, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= top_p  # the top-1 has mass_before 0, so it is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, seen: Tensor | None, gen: GenerationConfig) -> Tensor:
    """Penalty always (when on); temperature and top-p only when sampling. (R, V) -> (R, V)."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, gen.repetition_penalty)
    if gen.do_sample:
        logits = top_p_filter(logits / gen.temperature, gen.top_p)
    return logits


# ---- the model, step by step -------------------------------------------------------------

def static_cache_length(tokens: int) -> int:
    """Slots of a compiled decoder's static cache for ``tokens`` positions: the next power of two
    from 64 on, so prompts and answer budgets of similar length share one compiled shape."""
    return max(64, 1 << (tokens - 1).bit_length())


class _Decoder:
    """Runs the LM over a growing sequence of R rows; cached (new positions only) or recomputed.

    ``static_len`` > 0: a static cache of that many slots, and decoding steps through the LM's
    compiled forward; the attention mask given to the model is padded with zeros to the cache's
    length, so every step has the same shapes."""

    def __init__(self, lm: LanguageModel, embeds: Tensor, attention_mask: Tensor, use_cache: bool,
                 lora_mask: Tensor | None = None, static_len: int = 0):
        self.lm = lm
        self.embeds = embeds  # (R, T, D): the whole sequence so far (kept only without a cache)
        self.mask = attention_mask.long()  # (R, T): past + current positions
        # (R, T) bool: where position-limited adapters act (lm.adapter_mask of the image slots)
        self.lora_mask = lm.adapter_mask(lora_mask if lora_mask is not None
                                         else torch.zeros_like(attention_mask, dtype=torch.bool))
        config = lm.base_model().config
        self.static_len = static_len
        if static_len and static_len < attention_mask.shape[1]:
            raise ValueError(f"a static cache of {static_len} slots cannot hold {attention_mask.shape[1]} prompt tokens")
        self.cache = (None if not use_cache else StaticCache(config=config, max_cache_len=static_len) if static_len
                      else DynamicCache(config=config))
        self.step_model = lm.compiled_model() if static_len else lm.model

    def _run(self, embeds: Tensor, model: nn.Module) -> Tensor:
        """Forward the newest ``embeds`` (R, t, D); returns the last position's logits (R, V)."""
        positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -embeds.shape[1]:].contiguous()  # (R, t); 1st: 0
        mask = self.mask
        if self.static_len:  # (R, S): the cache's slots, those not yet written masked out
            mask = nn.functional.pad(mask, (0, self.static_len - mask.shape[1]))
        with self.lm.lora_positions(self.lora_mask[:, -embeds.shape[1]:]):
            if model is not self.lm.model and embeds.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                        cache=self.cache, use_cache=self.cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float().clone()  # (R, V); a copy: CUDA graphs reuse their outputs

    def prefill(self) -> Tensor:
        return self._run(self.embeds, self.lm.model)

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (R,) and return the next logits (R, V)."""
        if self.static_len and self.mask.shape[1] >= self.static_len:
            raise RuntimeError(f"the static cache's {self.static_len} slots are full")
        new = self.lm.embed(tokens[:, None])  # (R, 1, D)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)  # (R, T+1)
        self.lora_mask = torch.cat([self.lora_mask, self.lm.adapter_mask_next(self.lora_mask)], dim=1)
        if self.cache is not None:
            return self._run(new, self.step_model)
        self.embeds = torch.cat([self.embeds, new.to(self.embeds.dtype)], dim=1)  # (R, T+1, D)
        return self._run(self.embeds, self.lm.model)

    def select(self, rows: Tensor) -> None:
        """Keep / repeat / reorder rows (beam search): row i becomes old row ``rows[i]``."""
        self.mask, self.lora_mask = self.mask[rows], self.lora_mask[rows]
        if self.cache is None:
            self.embeds = self.embeds[rows]
        elif self.static_len:
            self._select_static(rows)
        else:  # Cache.reorder_cache: index_select(0, rows) on every layer's keys and values
            self.cache.reorder_cache(rows)

    def _select_static(self, rows: Tensor) -> None:
        """``select`` for the static cache: in place when the row count stays (a compiled step, and
        its CUDA graph, keep reading the same tensors), new tensors when it changes (beam search
        repeating each prompt K times, before any compiled step)."""
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            if len(rows) == layer.keys.shape[0]:
                layer.keys.copy_(layer.keys.index_select(0, rows))
                layer.values.copy_(layer.values.index_select(0, rows))
            else:
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
                layer.batch_size = len(rows)
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)


def _cut_at_stop(tokenizer: Any, ids: list[int], stop: list[str]) -> tuple[str, list[int], bool]:
    """Decode new tokens; at a stop string cut the text there and keep only the tokens wholly before it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return text, ids, False
    cut = min(hits)
    keep = len(ids)
    while keep > 0 and len(tokenizer.decode(ids[:keep], skip_special_tokens=True)) > cut:
        keep -= 1
    return text[:cut], ids[:keep], True


# ---- the loops -----------------------------------------------------------------------------

def _greedy_or_sample(dec: _Decoder, gen: GenerationConfig, tokenizer: Any, eos: set[int], pad: int,
                      seen: Tensor | None, on_step: StepCallback | None = None
                      ) -> tuple[list[str], list[list[int]], list[str]]:
    rng = torch.Generator(device=dec.mask.device).manual_seed(gen.seed) if gen.seed is not None else None
    b = dec.mask.shape[0]
    ids: list[list[int]] = [[] for _ in range(b)]
    cut_texts: dict[int, str] = {}  # rows stopped by a stop string -> their text, cut before it
    reasons: list[str | None] = [None] * b
    logits = dec.prefill()  # (B, V)
    for step in range(gen.max_new_tokens):
        logits = process_logits(logits, seen, gen)  # (B, V)
        nxt = (torch.multinomial(logits.softmax(dim=-1), 1, generator=rng).squeeze(1) if gen.do_sample
               else logits.argmax(dim=-1))  # (B,)
        for i, tok in enumerate(nxt.tolist()):
            if reasons[i] is not None:
                nxt[i] = pad  # finished rows keep producing pad, never recorded
            elif tok in eos:
                reasons[i] = "stop"
            else:
                ids[i].append(tok)
                if gen.stop:
                    text, ids[i], hit = _cut_at_stop(tokenizer, ids[i], gen.stop)
                    if hit:
                        cut_texts[i], reasons[i] = text, "stop"
        if seen is not None:
            seen[torch.arange(b, device=nxt.device), nxt] = True
        if on_step is not None:
            for i, reason in (on_step(ids, reasons) or {}).items():
                reasons[i] = reasons[i] or reason
        if all(r is not None for r in reasons) or step == gen.max_new_tokens - 1:
            break
        logits = dec.step(nxt)
    texts = [cut_texts[i] if i in cut_texts else tokenizer.decode(x, skip_special_tokens=True)
             for i, x in enumerate(ids)]
    return texts, ids, [r or "length" for r in reasons]


Hyp = tuple[float, str, list[int], str]  # a finished hypothesis: (normalised score, text, new ids, reason)
Live = tuple[int, int, float]  # a live beam: (source beam, new token, summed log-prob)


def _expand_row(i: int, k: int, vocab: int, vals: list[float], idx: list[int], beams: list[list[int]],
                hyps: list[Hyp], n: int, tokenizer: Any, eos: set[int], stop: list[str]) -> list[Live]:
    """One row's 2K best candidates -> up to K live (source beam, token, score); finished ones go to ``hyps``.

    As in HF, a candidate that ends (eos / stop string) becomes a hypothesis only if it ranks among
    the top K; its score is normalised by ``n``, the number of new tokens including the eos/stop one."""
    alive: list[Live] = []
    for rank, (v, j) in enumerate(zip(vals, idx)):
        if len(alive) == k or v == float("-inf"):
            break
        beam, tok = i * k + j // vocab, j % vocab
        if tok in eos:
            text, kept, ended = tokenizer.decode(beams[beam], skip_special_tokens=True), beams[beam], True
        elif stop:
            text, kept, ended = _cut_at_stop(tokenizer, beams[beam] + [tok], stop)
        else:
            ended = False
        if not ended:
            alive.append((beam, tok, v))
        elif rank < k:
            hyps.append((v / n, text, kept, "stop"))
    return alive


def _beam_search(dec: _Decoder, gen: GenerationConfig, tokenizer: Any, eos: set[int], pad: int,
                 seen: Tensor | None) -> tuple[list[str], list[list[int]], list[str]]:
    """Beam search, K beams per row; a hypothesis scores sum(log p) / (its new tokens incl. eos/stop).

    A row is done when it holds K finished hypotheses and its best live beam, normalised by the
    current length, cannot beat the worst of them (HF's ``early_stopping=False`` heuristic)."""
    (b, k), device = (dec.mask.shape[0], gen.num_beams), dec.mask.device
    logits = dec.prefill().repeat_interleave(k, dim=0)  # (B*K, V)
    dec.select(torch.arange(b, device=device).repeat_interleave(k))  # every beam starts from its row's prompt
    seen = seen.repeat_interleave(k, dim=0) if seen is not None else None  # (B*K, V)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # identical beams at the start: let only the first one expand
    beams: list[list[int]] = [[] for _ in range(b * k)]
    hyps: list[list[Hyp]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(gen.max_new_tokens):
        last = step == gen.max_new_tokens - 1
        logp = process_logits(logits, seen, gen).log_softmax(dim=-1)  # (B*K, V)
        cand = (scores.view(-1, 1) + logp).view(b, -1)  # (B, K*V)
        top_vals, top_idx = cand.topk(2 * k, dim=-1)  # (B, 2K)
        picked: list[Live] = []
        for i in range(b):
            alive = [] if done[i] else _expand_row(i, k, logp.shape[-1], top_vals[i].tolist(),
                                                   top_idx[i].tolist(), beams, hyps[i], step + 1, tokenizer,
                                                   eos, gen.stop)
            if last:  # out of tokens: the live beams end here
                hyps[i] += [(v / (step + 1), tokenizer.decode(beams[s] + [t], skip_special_tokens=True),
                             beams[s] + [t], "length") for s, t, v in alive]
            hyps[i] = sorted(hyps[i], key=lambda h: -h[0])[:k]
            best_alive = max((v for *_, v in alive), default=float("-inf")) / (step + 1)
            done[i] = done[i] or (len(hyps[i]) >= k and best_alive <= hyps[i][-1][0])
            picked += alive + [(i * k, pad, float("-inf"))] * (k - len(alive))  # dead filler beams
        rows = torch.tensor([p[0] for p in picked], device=device)  # (B*K,) source beam of each new beam
        nxt = torch.tensor([p[1] for p in picked], device=device)  # (B*K,)
        scores = torch.tensor([p[2] for p in picked], device=device).view(b, k)
        beams = [beams[s] + [t] for s, t, _ in picked]
        if all(done) or last:
            break
        if seen is not None:
            seen = seen[rows]
            seen[torch.arange(b * k, device=device), nxt] = True
        dec.select(rows)  # reorder the KV cache (or the recomputed sequence) by source beam
        logits = dec.step(nxt)
    best = [h[0] for h in hyps]
    return [h[1] for h in best], [h[2] for h in best], [h[3] for h in best]


# ---- public entry points -----------------------------------------------------------------

@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the call; restores every submodule's own previous mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def generate(lm: LanguageModel, inputs_embeds: Tensor, attention_mask: Tensor, tokenizer: Any,
             gen: GenerationConfig, eos_token_ids: list[int] | None = None,
             input_ids: Tensor | None = None, on_step: StepCallback | None = None,
             lora_mask: Tensor | None = None) -> GenerationOutput:
    """Continue each row of a LEFT-padded batch of prompt embeddings (B, T, Dlm) with mask (B, T).

    Stops a row at any of ``eos_token_ids`` plus the tokenizer's eos (pass the chat template's
    end-of-turn id here), at a stop string, or after ``gen.max_new_tokens``. The repetition penalty
    counts every token generated so far and, when ``input_ids`` (B, T) is given, the prompt's text
    tokens (positions where ``attention_mask`` is 1 and the id is >= 0; mark image slots -1).
    ``on_step`` (greedy and sampling only) sees every step; see the module docstring. ``lora_mask``
    (B, T) marks the image slots, which place position-limited adapters (``lora.positions``).
    """
    if on_step is not None and gen.num_beams > 1:
        raise ValueError("on_step works with greedy decoding and sampling, not beam search")
    if inputs_embeds.dim() != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"need inputs_embeds (B, T, D) and attention_mask (B, T), got "
                         f"{tuple(inputs_embeds.shape)} and {tuple(attention_mask.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be LEFT-padded (every row's last position is a real token); see pad_left")
    eos = set(eos_token_ids or []) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    seen = None  # (B, V) bool: tokens the repetition penalty applies to
    if gen.repetition_penalty != 1.0:
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        seen = torch.zeros(inputs_embeds.shape[0], vocab, dtype=torch.bool, device=inputs_embeds.device)
        if input_ids is not None:
            prompt = attention_mask.bool() & (input_ids >= 0)  # (B, T)
            seen[prompt.nonzero()[:, 0], input_ids[prompt]] = True
    with _eval_mode(lm):
        static_len = static_cache_length(inputs_embeds.shape[1] + gen.max_new_tokens) if gen.compile else 0
        dec = _Decoder(lm, inputs_embeds, attention_mask, gen.use_cache, lora_mask, static_len)
        if gen.num_beams > 1:
            texts, ids, reasons = _beam_search(dec, gen, tokenizer, eos, pad, seen)
        else:
            texts, ids, reasons = _greedy_or_sample(dec, gen, tokenizer, eos, pad, seen, on_step)
    return GenerationOutput(texts=texts, token_ids=ids, finish_reasons=reasons,
                            num_prompt_tokens=attention_mask.long().sum(dim=1).tolist())


@torch.no_grad()
def generate_from_images(vlm: nn.Module, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         image_mask: Tensor, gen: GenerationConfig,
                         eos_token_ids: list[int] | None = None,
                         on_step: StepCallback | None = None) -> GenerationOutput:
    """Image features (B, N, Dv) + LEFT-padded prompts (B, T) whose ``image_mask`` marks each row's Q
    image slots -> the VLM's answers. The image slots never count for the repetition penalty."""
    with _eval_mode(vlm):
        tokens = vlm.image_tokens(image_embeds)  # (B, Q, Dlm)
        embeds = vlm.merge(vlm.llm.embed(input_ids), tokens, image_mask)  # (B, T, Dlm)
        text_ids = input_ids.masked_fill(image_mask, -1)  # (B, T): image slots do not count for the penalty
        return generate(vlm.llm, embeds, attention_mask, vlm.llm.tokenizer, gen, eos_token_ids, input_ids=text_ids,
                        on_step=on_step, lora_mask=image_mask)
