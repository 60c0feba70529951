"""Retention: does the LLM keep what it knew once its LoRA adapters are trained on images?

The article's change to BLIP-2 (§3.3) is to train LoRA adapters in the LLM instead of freezing it;
the price could be the LLM's text skills. Two checks compare the adapted LLM with its own base
(the same weights with the adapters switched off, ``LanguageModel.adapters_disabled``):

- ``perplexity`` on a held-out English text shipped with the package (``retention_text.txt``,
  about 1,400 words on rivers, weather and bread, written for this project): plain text, no chat
  template, sliding windows as in the Hugging Face perplexity guide, every token scored once;
- ``FACTS``: text-only questions asked through the LLM's chat template, greedy decoding; an answer
  is right when it contains one of the fact's keywords as a word (case-insensitive). Only
  questions the packaged base SmolLM2-135M-Instruct answers right are kept
  (``tests/test_retention.py::test_packaged_smollm2_knows_every_fact``), so a lost fact means the
  adapters broke it.
"""

from __future__ import annotations

import contextlib
import math
import re
from importlib import resources
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from qvlm.models.llm import LanguageModel


class Fact(NamedTuple):
    question: str
    keywords: tuple[str, ...]  # right if any appears as a word in the answer


FACTS: tuple[Fact, ...] = (  # each answered right by the packaged base SmolLM2-135M-Instruct
    Fact("What is the capital of France?", ("Paris",)),
    Fact("What is the capital of Japan?", ("Tokyo",)),
    Fact("What is the chemical formula of water?", ("H2O",)),
    Fact("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    Fact("How many days are there in a week?", ("seven", "7")),
    Fact("What colour is the sky on a clear day?", ("blue",)),
    Fact("Which planet is known as the Red Planet?", ("Mars",)),
    Fact("What is the largest ocean on Earth?", ("Pacific",)),
)
# Asked and dropped, the base model gets them wrong: the largest planet ("Neptune, but it's actually
# Uranus"), water's freezing point in Celsius ("-18.0°C"), the capital of Italy, a spider's legs.


def default_text() -> str:
    """The held-out English text shipped with the package."""
    return resources.files("qvlm.eval").joinpath("retention_text.txt").read_text(encoding="utf-8")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch dropout off (LoRA has some) for a measurement; restore the previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def perplexity(lm: LanguageModel, tokenizer: Any, text: str, max_len: int = 512, stride: int | None = None) -> float:
    """Token-level perplexity of plain ``text``: exp(mean NLL of every token after the first).

    Windows of ``max_len`` tokens (at most the model's ``max_position_embeddings``) move by
    ``stride`` (default: half a window); each token is scored once, in the first window that
    reaches it, with up to ``max_len - stride`` earlier tokens as context. Runs through
    ``lm(inputs_embeds=lm.embed(ids), ...)``, so whatever adapters are active count.
    """
    if max_len < 2 or (stride is not None and not 0 < stride <= max_len):
        raise ValueError(f"need max_len >= 2 and 0 < stride <= max_len, got max_len={max_len}, stride={stride}")
    limit = getattr(lm.base_model().config, "max_position_embeddings", None)
    max_len = min(max_len, int(limit)) if limit else max_len
    stride = max_len // 2 if stride is None else min(stride, max_len)
    device = lm.model.get_input_embeddings().weight.device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # (1, T)
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the text has {n}")
    nll, scored = 0.0, 0
    prev_end = 0
    with _eval_mode(lm):
        for start in range(0, n, stride):
            end = min(start + max_len, n)
            window = ids[:, start:end]  # (1, T)
            labels = window.clone()
            labels[:, : prev_end - start] = -100  # scored by an earlier window: context only
            out = lm(inputs_embeds=lm.embed(window), attention_mask=torch.ones_like(window), labels=labels)
            k = int((labels[:, 1:] != -100).sum())  # the model shifts labels: position 0 is never scored
            nll += float(out.loss) * k
            scored += k
            prev_end = end
            if end == n:
                break
    return math.exp(nll / scored)


@torch.no_grad()
def answer(lm: LanguageModel, question: str, max_new_tokens: int = 32) -> str:
    """The LLM's greedy answer to a text-only question, asked through its chat template."""
    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    device = lm.model.get_input_embeddings().weight.device
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    with _eval_mode(lm):
        out = lm.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def is_correct(text: str, keywords: tuple[str, ...]) -> bool:
    """Any keyword as a whole word or number, case-insensitive: "7" matches "7 days." but not
    "17" or "7.5"; "Paris" matches "Paris." but not "Parisian"."""
    patterns = (rf"(?<!\w)(?<!\d\.){re.escape(k)}(?!\w|\.\d)" for k in keywords)
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def retention_report(lm: LanguageModel, text: str | None = None,
                     facts: Sequence[tuple[str, str | Sequence[str]]] = FACTS, max_new_tokens: int = 32) -> dict:
    """Perplexity and fact answers of the base LLM (adapters off) and the adapted one (adapters on).

    ``facts`` are (question, keyword or keywords) pairs. ``facts_kept`` counts facts the adapted
    LLM answers right, ``facts_base`` those the base does; ``answers`` has both answers per fact.
    """
    text = default_text() if text is None else text
    facts = [Fact(q, (k,) if isinstance(k, str) else tuple(k)) for q, k in facts]
    with lm.adapters_disabled():
        ppl_base = perplexity(lm, lm.tokenizer, text)
        base = [answer(lm, f.question, max_new_tokens) for f in facts]
    ppl_adapted = perplexity(lm, lm.tokenizer, text)
    adapted = [answer(lm, f.question, max_new_tokens) for f in facts]
    answers = [
        {"question": f.question, "expected": list(f.keywords), "base": b, "adapted": a,
         "kept": is_correct(a, f.keywords)}
        for f, b, a in zip(facts, base, adapted, strict=True)
    ]
    return {
        "ppl_base": ppl_base,
        "ppl_adapted": ppl_adapted,
        "ppl_ratio": ppl_adapted / ppl_base,
        "facts_total": len(facts),
        "facts_kept": sum(a["kept"] for a in answers),
        "facts_base": sum(is_correct(b, f.keywords) for f, b in zip(facts, base, strict=True)),
        "answers": answers,
    }
