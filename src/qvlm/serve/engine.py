"""The model side of the server: a request -> a prepared job (image, prompt tokens, limits), and a batch
of jobs -> one KV-cached generate call whose per-step callback streams each row's text.

``prepare`` runs in a request thread (image decoding, preprocessing and tokenising happen there, in
parallel); ``run_batch`` runs in the batcher's worker thread. Rows of a batch share the sampling
settings (the batcher groups by ``sampling_key``); each row keeps its own ``max_tokens`` and stop
strings, enforced in the step callback, which also stops rows whose client left. The prompt is the
model's chat template with the image slots, built exactly as for training (``qvlm.prompt``).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import Tensor

from qvlm.inference import default_prompts
from qvlm.models.generate import GenerationConfig, generate_from_images, pad_left
from qvlm.prompt import PromptError, build_chat, end_of_turn_ids
from qvlm.serve.batcher import Job
from qvlm.serve.images import load_image
from qvlm.serve.schemas import IMAGE_SLOT, ChatRequest, Limits, bad

CHARS_PER_TOKEN_CAP = 16  # text longer than max_prompt_tokens x this is refused before tokenising


@dataclass
class Prepared:
    """One request, ready for the batcher."""

    input_ids: list[int]  # (T,) the rendered prompt with Q image slots
    image_mask: list[bool]  # (T,)
    pixels: Tensor  # (1, 3, H, W) preprocessed image
    max_tokens: int
    stop: list[str]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def sampling_key(req: ChatRequest) -> Hashable:
    """Jobs with equal keys can share one generate call. Seeded requests run alone (reproducible)."""
    if req.seed is not None:
        return ("seeded", uuid.uuid4().hex)
    if req.temperature == 0:
        return ("greedy",)
    return ("sample", req.temperature, req.top_p)


class TextStream:
    """Decoded text of one row as it grows: deltas that never need retracting.

    Held back until safe: a trailing incomplete UTF-8 character (U+FFFD) and any tail that could be
    the start of a stop string; leading whitespace is dropped (the chat template already ends the line).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = stop
        self.sent = ""

    def text(self, ids: list[int]) -> tuple[str, bool]:
        """(the text so far, cut before the first stop string; whether a stop string was found)."""
        text = self.decode(ids).lstrip()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(new safe text since the last call, whether a stop string ended the row)."""
        text, hit = self.text(ids)
        if not hit:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._partial_stop(text)]
        return self._advance(text), hit

    def final(self, ids: list[int]) -> tuple[str, str]:
        """(the last delta, the whole answer) when the row ends."""
        text, _ = self.text(ids)
        return self._advance(text), text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding rewrote earlier text: never retract what was sent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class Engine:
    def __init__(self, vlm, model_id: str, limits: Limits | None = None, compile: bool = False):
        if vlm.llm is None or vlm.projector is None:
            raise ValueError("serving needs a stage-2 model (with an LLM and a projector)")
        self.vlm = vlm.eval()
        self.model_id = model_id
        self.limits = limits or Limits()
        self.created = int(time.time())
        self.tokenizer = vlm.llm.tokenizer
        self.tokenizer_lock = threading.Lock()  # one tokenizer, used by request threads and the worker
        self.eos = end_of_turn_ids(self.tokenizer)
        self.device = next(vlm.qformer.parameters()).device
        self.context = getattr(vlm.llm.base_model().config, "max_position_embeddings", None)
        self.compile = compile  # decoding steps through the LLM's compiled forward (GenerationConfig.compile)

    @classmethod
    def load(cls, path: str | Path, limits: Limits | None = None, model_id: str | None = None,
             device: str = "cpu", compile: bool = False) -> "Engine":
        from qvlm.models.vlm import VLM

        path = Path(path)
        if not (path / "projector.safetensors").is_file():
            raise ValueError(f"{path} is not a stage-2 model folder (no projector.safetensors)")
        vlm = VLM.from_pretrained(path, with_llm=True).to(device)
        return cls(vlm, model_id or path.resolve().name, limits, compile=compile)

    @torch.no_grad()
    def warm_up(self) -> float:
        """With ``compile``: one request for a blank image with the default answer budget (so its
        static cache has the length most requests get), stopped after its first compiled step, so
        the decoding step is compiled before the first client waits for it. Other batch sizes and
        cache lengths compile once more when they first come (then with dynamic shapes, which
        serve every later size). Returns the seconds it took."""
        from PIL import Image

        from qvlm.inference import default_prompt_len, describe_embeds

        start = time.perf_counter()
        if self.compile:
            pixels = self.vlm.vision.processor([Image.new("RGB", (64, 64))]).to(self.device)  # resized to the tower's
            steps: list[int] = []

            def after_one_compiled_step(rows: list[list[int]], reasons: list[str | None]) -> dict[int, str]:
                steps.append(len(rows[0]))  # called after the prefill's token, then after each step's
                return {0: "stop"} if len(steps) > 1 else {}

            gen = GenerationConfig(max_new_tokens=max(self.answer_room(default_prompt_len(self.vlm)), 2), compile=True)
            describe_embeds(self.vlm, self.vlm.image_features(pixels), gen=gen, on_step=after_one_compiled_step)
        return time.perf_counter() - start

    def answer_room(self, prompt_tokens: int) -> int:
        """The most new tokens a prompt of this length may get: ``limits.max_tokens``, capped by the
        LLM's context."""
        lim = self.limits.max_tokens
        return lim if self.context is None else min(lim, self.context - prompt_tokens)

    # ---- request threads -----------------------------------------------------------------

    def prepare(self, req: ChatRequest) -> Prepared:
        """Decode the image and render the prompt; ``APIError`` for anything over a limit."""
        lim = self.limits
        messages = self.conversation(req)
        chars = sum(len(m["content"]) for m in messages)
        if chars > lim.max_prompt_tokens * CHARS_PER_TOKEN_CAP:
            raise too_many_tokens(f"the prompt is {chars} characters; this server takes at most "
                                  f"{lim.max_prompt_tokens} tokens")
        cfg = self.vlm.config.model.llm
        try:
            with self.tokenizer_lock:
                example = build_chat(self.tokenizer, self.vlm.qformer.num_queries, messages, cfg.image_placeholder,
                                     image_position=cfg.image_position)
        except PromptError as exc:
            raise bad(f"the prompt cannot be rendered: {exc}", param="messages") from exc
        n = len(example.input_ids)
        if n > lim.max_prompt_tokens:
            raise too_many_tokens(f"the prompt is {n} tokens (chat template and {self.vlm.qformer.num_queries} "
                                  f"image slots included); this server takes at most {lim.max_prompt_tokens}")
        room = self.answer_room(n)
        if room < 1:
            raise too_many_tokens(f"the prompt is {n} tokens and fills the model's context of {self.context}")
        if req.max_tokens is not None and req.max_tokens > room:
            raise bad(f"'max_tokens' is {req.max_tokens} but the {n}-token prompt leaves room for {room} "
                      f"(context {self.context})", param="max_tokens", code="context_length_exceeded")
        image = load_image(req.image_url, lim)
        pixels = self.vlm.vision.processor([image])  # (1, 3, H, W)
        return Prepared(example.input_ids, example.image_mask, pixels, req.max_tokens or room, req.stop)

    def conversation(self, req: ChatRequest) -> list[dict]:
        """The request's turns for the chat template: the default system prompt when it has none, the
        image placeholder in the turn with the image, the default user prompt for a last turn that
        holds only the image."""
        default_system, default_user = default_prompts(self.vlm)
        system = req.system if req.system is not None else default_system
        placeholder = self.vlm.config.model.llm.image_placeholder
        turns = [dict(t) for t in req.messages]
        if turns[-1]["content"] in ("", IMAGE_SLOT):
            turns[-1]["content"] += default_user
        for t in turns:
            t["content"] = t["content"].replace(placeholder, "").replace(IMAGE_SLOT, f"{placeholder}\n")
        return ([{"role": "system", "content": system}] if system else []) + turns

    def generation_config(self, req: ChatRequest, max_new_tokens: int) -> GenerationConfig:
        sample = req.temperature > 0
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=req.temperature if sample else 1.0, top_p=req.top_p if sample else 1.0,
                                seed=req.seed, compile=self.compile)

    # ---- the worker thread ---------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def run_batch(self, jobs: list[Job]) -> None:
        """Generate for every job at once; each job gets "delta" events, then one "done"."""
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                job.emit("done", finish_reason="cancelled")
            else:
                live.append(job)
        if not live:
            return
        preps: list[Prepared] = [job.payload.prepared for job in live]
        pixels = torch.cat([p.pixels for p in preps]).to(self.device)  # (B, 3, H, W)
        feats = self.vlm.image_features(pixels)  # (B, N, Dv)
        ids, mask, image_mask = pad_left([p.input_ids for p in preps], [p.image_mask for p in preps],
                                         self.tokenizer.pad_token_id)  # (B, T) each
        gen = self.generation_config(live[0].payload.request, max(p.max_tokens for p in preps))
        streams = [TextStream(self.decode, p.stop) for p in preps]

        def finish(i: int, row: list[int], reason: str) -> None:
            delta, text = streams[i].final(row)
            if delta:
                live[i].emit("delta", text=delta)
            live[i].emit("done", finish_reason=reason, text=text, prompt_tokens=preps[i].prompt_tokens,
                         completion_tokens=len(row))

        def on_step(rows: list[list[int]], reasons: list[str | None]) -> dict[int, str]:
            ended: dict[int, str] = {}
            for i, job in enumerate(live):
                if job.done:
                    continue
                if job.cancelled.is_set():
                    ended[i] = "cancelled"
                    job.emit("done", finish_reason="cancelled")
                elif reasons[i] is not None:  # the model ended its turn
                    finish(i, rows[i], reasons[i])
                else:
                    delta, hit = streams[i].update(rows[i])
                    if delta:
                        job.emit("delta", text=delta)
                    if hit or len(rows[i]) >= preps[i].max_tokens:
                        ended[i] = "stop" if hit else "length"
                        finish(i, rows[i], ended[i])
            return ended

        out = generate_from_images(self.vlm, feats, ids.to(self.device), mask.to(self.device),
                                   image_mask.to(self.device), gen, eos_token_ids=self.eos, on_step=on_step)
        for i, job in enumerate(live):
            if not job.done:
                finish(i, out.token_ids[i], out.finish_reasons[i])


@dataclass
class Work:
    """A job's payload: the parsed request and what ``prepare`` made of it."""

    request: ChatRequest
    prepared: Prepared


def too_many_tokens(message: str):
    return bad(message, param="messages", code="context_length_exceeded")
